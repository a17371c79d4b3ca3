"""A run resumes only from the same record content and settings; one run writes an output folder at a
time; a record is not replaced while a run reads it.

Every refusal must be one line (the problem and the fix), exit status 2, no traceback, and leave the
work directory exactly as it was (``snapshot`` from test_bad_inputs: names, sizes, times, modes and
contents). The runs are real: BURN, ABL and the detectors on the digits records of conftest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from burnkit import engine
from burnkit.attack import get_attack, list_attacks
from burnkit.defense import get_defense, list_defenses
from burnkit.defenses import burn as burn_mod
from burnkit.detector import get_detector, list_detectors
from burnkit.safe_load import safe_torch_load
from conftest import DIGITS_TRAINING
from test_bad_inputs import snapshot

REPO = Path(__file__).resolve().parents[1]
RECORD = "badnet_digits"
OTHER = "blended_digits"  # same split, same seed, so the same poison indices: only images and weights differ
# cheap BURN settings; the premise test is off so that every run gets to its fine-tunings
FAST_BURN = ["--iterations", "1", "--epochs", "1", "--max_iter", "5", "--candidates", "2", "--progress", "false",
             "--premise_check", "false"]


def refusal(capsys, fn, argv, work: Path) -> str:
    """Run an entry point that must refuse: exit 2, one line, no traceback, nothing changed on disk.
    Returns the line."""
    capsys.readouterr()  # what earlier steps of the test printed
    before = snapshot(work)
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0] and ": error: " in err[0], err
    assert snapshot(work) == before
    return err[0]


def burn(*extra):
    return get_defense("burn").main(["--result_file", RECORD, *FAST_BURN, *extra])


def burn_output(work: Path) -> Path:
    return work / "record" / RECORD / "defense" / "burn"


def run_interrupted(monkeypatch, target, name: str, at_call: int, run, after: bool = False) -> None:
    """Run the entry point ``run()`` with ``target.<name>`` raising KeyboardInterrupt at its
    ``at_call``-th call (before the real call, or after it with ``after``), as a kill there would."""
    real = getattr(target, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        due = len(calls) == at_call
        if due and not after:
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if due:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(target, name, wrapper)
    with pytest.raises(SystemExit):
        run()
    monkeypatch.setattr(target, name, real)


def kill_burn_in_its_last_finetuning(monkeypatch, *extra):
    """A BURN run interrupted during its second fine-tuning: the scan and iteration 0 are on disk."""
    run_interrupted(monkeypatch, burn_mod, "finetune_set", 2, lambda: burn(*extra))
    out = burn_output(Path.cwd())
    assert (out / "checkpoint" / "burn_state.pt").is_file() and not (out / "defense_result.pt").exists()


def kill_after_first_epoch(monkeypatch, run):
    """Run ``run()`` and interrupt it right after the first checkpoint of the engine's training loop."""
    run_interrupted(monkeypatch, engine, "_save_checkpoint", 1, run, after=True)


def replace_record_with_other(work: Path) -> None:
    """Put the Blended record's attack_result.pt and PNG folders where the BadNets record's were
    (what a user copying records around does): same sample count, same poison indices."""
    target, source = work / "record" / RECORD, work / "record" / OTHER
    shutil.copy2(source / "attack_result.pt", target / "attack_result.pt")
    for folder in ("bd_train_dataset", "bd_test_dataset"):
        shutil.rmtree(target / folder)
        shutil.copytree(source / folder, target / folder)


def replace_record_weights_with_other(work: Path) -> None:
    """Keep the record's data, swap in the other record's model weights (same architecture)."""
    path = work / "record" / RECORD / "attack_result.pt"
    raw = safe_torch_load(path)
    raw["model"] = safe_torch_load(work / "record" / OTHER / "attack_result.pt")["model"]
    torch.save(raw, path)


def lock_files(work: Path) -> list[Path]:
    return sorted(p for p in work.rglob("*") if p.name.endswith(".lock"))


# ----------------------------------------------------------------------------- resume: record content


@pytest.mark.parametrize("change", [replace_record_with_other, replace_record_weights_with_other],
                         ids=["record-replaced", "weights-replaced"])
def test_burn_refuses_to_resume_on_other_record_content_with_as_many_samples(change, digits_copy, monkeypatch,
                                                                             capsys):
    kill_burn_in_its_last_finetuning(monkeypatch)
    change(digits_copy)
    line = refusal(capsys, get_defense("burn").main, ["--result_file", RECORD, *FAST_BURN], digits_copy)
    assert "checkpoint" in line and "--resume false" in line


def test_burn_resumes_after_a_record_moves_and_run_only_settings_change(digits_copy, monkeypatch):
    """The fingerprint is the content, not the path; progress, device, test cadence and log folder
    do not change results, so they may differ on resume."""
    kill_burn_in_its_last_finetuning(monkeypatch)
    shutil.move(digits_copy / "record" / RECORD, digits_copy / "moved")
    counting = []
    real = burn_mod.finetune_set
    monkeypatch.setattr(burn_mod, "finetune_set", lambda *a, **kw: counting.append(1) or real(*a, **kw))
    argv = ["--result_file", str(digits_copy / "moved"), *FAST_BURN, "--device", "cpu", "--progress", "true",
            "--test_every", "2", "--log", str(digits_copy / "other_log")]
    result = get_defense("burn").main(argv)
    assert len(counting) == 1  # only the interrupted fine-tuning was run again
    assert (result["out_dir"] / "defense_result.pt").is_file()


# ----------------------------------------------------------------------------- resume: settings


@pytest.mark.parametrize("first, second", [
    (["--client_optimizer", "sgd", "--sgd_momentum", "0.9"], ["--client_optimizer", "sgd", "--sgd_momentum", "0.5"]),
    (["--scan_batch_size", "256"], ["--scan_batch_size", "100"]),
    (["--lr_scheduler", "CosineAnnealingLR", "--cos_t_max", "5"], ["--lr_scheduler", "CosineAnnealingLR",
                                                                   "--cos_t_max", "9"]),
], ids=["sgd_momentum", "scan_batch_size", "cos_t_max"])
def test_burn_refuses_to_resume_with_another_result_changing_setting(first, second, digits_copy, monkeypatch, capsys):
    kill_burn_in_its_last_finetuning(monkeypatch, *first)
    line = refusal(capsys, get_defense("burn").main, ["--result_file", RECORD, *FAST_BURN, *second], digits_copy)
    assert second[-2].lstrip("-") in line and "--resume false" in line


def test_only_the_documented_run_only_settings_are_left_out_of_resume_fingerprints():
    """Fingerprints hold every setting except a documented list of run-only ones, so a new setting is
    covered by default; the list holds nothing that changes what a run computes."""
    from burnkit.options import RUN_ONLY_KEYS, result_settings

    changes_results = {"lr", "sgd_momentum", "wd", "adam_betas", "epochs", "batch_size", "amp", "random_seed",
                       "lr_scheduler", "cos_t_max", "steplr_milestones", "client_optimizer", "max_iter",
                       "candidates", "scan_batch_size", "overshoot", "tuning_epochs", "momentum", "pratio"}
    assert not RUN_ONLY_KEYS & changes_results
    configs = [get(name).config_cls for names, get in ((list_attacks(), get_attack), (list_defenses(), get_defense),
                                                       (list_detectors(), get_detector)) for name in names]
    names = {f.name for config in configs for f in dataclasses.fields(config)}
    assert RUN_ONLY_KEYS <= names, RUN_ONLY_KEYS - names  # no stale entries
    for config in configs:
        settings = result_settings(config())
        assert set(settings) == {f.name for f in dataclasses.fields(config)} - RUN_ONLY_KEYS


def test_a_phase_checkpoint_of_other_record_content_is_refused_before_anything_is_written(digits_copy, monkeypatch,
                                                                                         capsys):
    argv = ["--result_file", RECORD, "--progress", "false", "--tuning_epochs", "2", "--finetuning_epochs", "1",
            "--unlearning_epochs", "1"]
    kill_after_first_epoch(monkeypatch, lambda: get_defense("abl").main(argv))
    replace_record_with_other(digits_copy)
    line = refusal(capsys, get_defense("abl").main, argv, digits_copy)
    assert "--resume false" in line


def test_abl_detector_refuses_to_resume_its_isolation_training_on_other_record_content(digits_copy, monkeypatch,
                                                                                      capsys):
    argv = ["--result_file", RECORD, "--progress", "false", "--tuning_epochs", "2"]
    kill_after_first_epoch(monkeypatch, lambda: get_detector("abl").main(argv))
    replace_record_with_other(digits_copy)
    line = refusal(capsys, get_detector("abl").main, argv, digits_copy)
    assert "--resume false" in line


# ----------------------------------------------------------------------------- detectors reading a BURN run


def test_burn_detector_refuses_scan_flags_that_contradict_the_run_it_reads(digits_copy, capsys):
    burn()  # --max_iter 5 --candidates 2
    argv = ["--result_file", RECORD, "--progress", "false", "--burn_output", "defense/burn", "--max_iter", "50"]
    line = refusal(capsys, get_detector("burn").main, argv, digits_copy)
    assert "--max_iter" in line and "5" in line


def test_burn_detector_records_the_scan_settings_of_the_run_it_reads(digits_copy):
    burn()
    summary = get_detector("burn").main(["--result_file", RECORD, "--progress", "false",
                                         "--burn_output", "defense/burn"])["summary"]
    assert summary["config"]["max_iter"] == 5 and summary["config"]["candidates"] == 2
    saved = json.loads((digits_copy / "record" / RECORD / "detection" / "burn_pretrain" /
                        "detection_scores.json").read_text())
    assert saved["config"]["max_iter"] == 5 and saved["config"]["candidates"] == 2


@pytest.mark.parametrize("detector, extra", [("burn", ["--burn_output", "defense/burn"]), ("burn_s", [])])
def test_burn_detectors_refuse_a_run_made_on_other_record_content(detector, extra, digits_copy, capsys):
    burn()
    replace_record_with_other(digits_copy)
    line = refusal(capsys, get_detector(detector).main, ["--result_file", RECORD, "--progress", "false", *extra],
                   digits_copy)
    assert "defense/burn" in line


# ----------------------------------------------------------------------------- locks


def test_a_second_run_on_the_same_output_is_refused_naming_the_folder_and_the_pid(digits_copy, monkeypatch, capsys):
    real = burn_mod.finetune_set
    second: list[str] = []

    def start_a_second_run(*args, **kwargs):
        if not second:
            second.append("started")  # once: the second run would call this too if it were let in
            before = snapshot(digits_copy)
            with pytest.raises(SystemExit) as exit_info:
                burn("--lr", "1e-4")
            second[0] = capsys.readouterr().err
            assert exit_info.value.code == 2 and snapshot(digits_copy) == before
        return real(*args, **kwargs)

    monkeypatch.setattr(burn_mod, "finetune_set", start_a_second_run)
    first = burn("--lr", "5e-5")
    lines = [line for line in second[0].splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert str(Path("record") / RECORD / "defense" / "burn") in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert (first["out_dir"] / "defense_result.pt").is_file()
    log = "".join(p.read_text() for p in (first["out_dir"] / "log").glob("*.log"))
    assert "'lr': 5e-05" in log and "'lr': 0.0001" not in log
    assert lock_files(digits_copy) == []  # a finished run leaves no lock behind


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from burnkit.locks import folder_lock
    with folder_lock(Path(sys.argv[1]), "the output folder"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_lock_left_by_a_killed_process_is_taken_over(digits_copy, capsys):
    out = burn_output(digits_copy)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, env=env,
                              cwd=digits_copy, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refusal(capsys, get_defense("burn").main, ["--result_file", RECORD, *FAST_BURN], digits_copy)
        assert f"pid {holder.pid}" in line and "defense/burn" in line
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    assert lock_files(digits_copy)  # SIGKILL left the lock file (and its dead pid) behind
    result = burn()
    assert (result["out_dir"] / "defense_result.pt").is_file()
    assert lock_files(digits_copy) == []


def test_attack_overwrite_is_refused_while_a_defense_reads_the_record(digits_copy, monkeypatch, capsys):
    real = burn_mod.finetune_set
    refused: list[str] = []
    record = digits_copy / "record" / RECORD

    def overwrite_the_record_meanwhile(*args, **kwargs):
        if not refused:
            before = snapshot(record)
            with pytest.raises(SystemExit) as exit_info:
                get_attack("badnet").main([*DIGITS_TRAINING, "--epochs", "1", "--save_folder_name", RECORD,
                                           "--overwrite", "true"])
            refused.append(capsys.readouterr().err)
            assert exit_info.value.code == 2 and snapshot(record) == before
        return real(*args, **kwargs)

    monkeypatch.setattr(burn_mod, "finetune_set", overwrite_the_record_meanwhile)
    result = burn()
    lines = [line for line in refused[0].splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0] and RECORD in lines[0]
    assert (result["out_dir"] / "defense_result.pt").is_file()
    assert not list((digits_copy / "record").glob(f"{RECORD}.replaced-*"))
    get_attack("badnet").main([*DIGITS_TRAINING, "--epochs", "1", "--save_folder_name", RECORD, "--overwrite", "true"])
    assert len(list((digits_copy / "record").glob(f"{RECORD}.replaced-*"))) == 1  # with no reader it goes ahead
    assert lock_files(digits_copy) == []


def test_a_defense_is_refused_while_an_attack_writes_the_record(digits_copy, monkeypatch, capsys):
    real = engine._save_checkpoint
    refused: list[str] = []

    def start_a_defense_meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        if not refused:
            with pytest.raises(SystemExit) as exit_info:
                get_defense("ft").main(["--result_file", "fresh", "--epochs", "1", "--progress", "false"])
            refused.append(capsys.readouterr().err)
            assert exit_info.value.code == 2

    # a record folder being written holds no attack_result.pt yet; copy one in, as a user might
    (digits_copy / "record" / "fresh").mkdir()
    shutil.copy2(digits_copy / "record" / RECORD / "attack_result.pt", digits_copy / "record" / "fresh")
    monkeypatch.setattr(engine, "_save_checkpoint", start_a_defense_meanwhile)
    get_attack("badnet").main([*DIGITS_TRAINING, "--epochs", "2", "--save_folder_name", "fresh", "--overwrite", "true"])
    lines = [line for line in refused[0].splitlines() if line.strip()]
    assert len(lines) == 1 and "fresh" in lines[0] and f"pid {os.getpid()}" in lines[0]


def test_a_burn_run_is_not_replaced_while_a_detector_reads_it(digits_copy, monkeypatch, capsys):
    from burnkit.detectors import burn as burn_detectors

    burn()
    real = burn_detectors.read_burn_samples
    refused: list[str] = []

    def overwrite_the_run_meanwhile(*args, **kwargs):
        if not refused:
            refused.append("started")
            before = snapshot(burn_output(digits_copy))
            with pytest.raises(SystemExit) as exit_info:
                burn("--overwrite", "true")
            refused[0] = capsys.readouterr().err
            assert exit_info.value.code == 2 and snapshot(burn_output(digits_copy)) == before
        return real(*args, **kwargs)

    monkeypatch.setattr(burn_detectors, "read_burn_samples", overwrite_the_run_meanwhile)
    get_detector("burn_s").main(["--result_file", RECORD, "--progress", "false"])
    lines = [line for line in refused[0].splitlines() if line.strip()]
    assert len(lines) == 1 and "defense/burn" in lines[0] and "being read" in lines[0]
    assert not list(burn_output(digits_copy).parent.glob("burn.replaced-*"))
