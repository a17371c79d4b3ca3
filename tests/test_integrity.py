"""Nothing made up, nothing half-written, nothing left behind.

* A model whose weights or outputs are NaN/Inf never yields a score or a file that looks finished:
  training that diverges stops in one line naming the learning-rate flag, and a model that overflows
  is refused where it would be scored (records, checkpoints and resources holding NaN/Inf are refused
  on loading: ``tests/test_bad_inputs.py``).
* A full disk while a ``.pt`` file is written is one line, for the OS error and for torch's own zip
  writer error, and leaves every earlier file as it was and no temporary file.
* A record name of 250 characters can be replaced with ``--overwrite``.
* A writer killed with SIGKILL leaves a temporary file; the next write into that folder removes it,
  and never the temporary file of a writer that is still running.

Every case runs a real entry point on the tiny digits records (see conftest).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from burnkit import fileio
from burnkit.errors import BurnError
from burnkit.records import write_attack_record, write_defense_result
from burnkit.safe_load import safe_torch_load
from conftest import DIGITS_TRAINING
from test_bad_inputs import FAST_BURN, RECORD, edit_record, run_entry, snapshot

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, entry: str, argv: list[str]) -> str:
    """Run ``entry`` and return its single error line (exit 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_entry(entry, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and ": error: " in lines[0], err
    return lines[0]


def ft(*argv: str) -> list[str]:
    return ["--result_file", RECORD, "--epochs", "1", "--progress", "false", *argv]


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


# ----------------------------------------------------------------------------- diverging training


def test_a_diverging_attack_stops_in_one_line_and_writes_no_record(digits_copy, capsys):
    line = one_line_error(capsys, "attack:badnet", [*DIGITS_TRAINING, "--epochs", "2", "--lr", "1e30",
                                                    "--save_folder_name", "diverged"])
    assert "training diverged in epoch 1 of 2" in line and "lower --lr (now 1e+30)" in line, line
    folder = digits_copy / "record" / "diverged"
    assert not (folder / "attack_result.pt").exists()
    assert not (folder / "checkpoint" / "train_state.pt").exists()  # the diverged epoch is not checkpointed


@pytest.mark.parametrize("batch_size, symptom", [("8", "the loss became nan"), ("256", "the outputs are NaN/Inf")],
                         ids=["several-steps", "one-step"])
def test_a_diverging_defense_stops_in_one_line_and_writes_no_result(digits_copy, capsys, batch_size, symptom):
    """With several steps the loss turns NaN; with one step (71 clean samples, batch 256) the weights
    are huge but finite and the outputs on the test set overflow: both stop the run."""
    record = digits_copy / "record" / RECORD
    before = snapshot(record)
    line = one_line_error(capsys, "defense:ft", ft("--lr", "1e30", "--batch_size", batch_size))
    assert "ft:finetune: training diverged in epoch 1 of 1" in line and symptom in line, line
    assert "lower --lr (now 1e+30)" in line, line
    assert not (record / "defense" / "ft" / "defense_result.pt").exists()
    assert {k: v for k, v in snapshot(record).items() if k in before} == before  # the record is untouched


def test_a_model_whose_outputs_overflow_gets_no_score(digits_copy, capsys):
    """Finite weights can still produce Inf/NaN outputs; ``argmax`` over them would report ASR 100 %."""
    def overflow(raw):
        last = [k for k, v in raw["model"].items() if v.is_floating_point() and v.dim() == 2][-1]
        raw["model"][last].fill_(3e38)
    edit_record(overflow)(digits_copy)
    line = one_line_error(capsys, "defense:ft", ft())
    assert "outputs are NaN/Inf on 360 of 360 clean test images, so ACC, ASR and RA cannot be measured" in line, line
    assert not (digits_copy / "record" / RECORD / "defense" / "ft" / "defense_result.pt").exists()


def test_a_model_with_nan_weights_is_never_written_as_finished(digits_copy, tmp_path):
    """The writers of the two files that mark an output as finished refuse NaN/Inf weights, whatever
    loop produced them (not only the engine's)."""
    state = safe_torch_load(digits_copy / "record" / RECORD / "attack_result.pt")["model"]
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    with pytest.raises(BurnError, match=r"weights hold NaN in model\[.*no defense result was written"):
        write_defense_result(tmp_path / "out" / "defense", "smallcnn", 10, state)
    with pytest.raises(BurnError, match="no attack record was written"):
        write_attack_record(tmp_path / "out" / "record", model_name="smallcnn", num_classes=10, state_dict=state,
                            clean_data="digits", bd_train=None, bd_test=None)
    assert not (tmp_path / "out").exists()


def test_a_resource_with_nan_weights_is_refused(digits_copy, capsys):
    from burnkit.resources import clean_model_path
    from burnkit.resources.__main__ import main as resources_main

    state = safe_torch_load(digits_copy / "record" / RECORD / "attack_result.pt")["model"]
    for v in state.values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    path = clean_model_path("rc", "digits", "smallcnn")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        resources_main(["lf_pattern", "--dataset", "digits", "--model", "smallcnn", "--resource_cache", "rc",
                        "--progress", "false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"clean model {path} holds NaN in " in err, err


# ----------------------------------------------------------------------------- a full disk


class _FullDisk:
    """A file whose every write fails as on a full disk (the error a real ``write(2)`` gives)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def _disk_full_for_torch_files(monkeypatch):
    """Every write of a temporary ``.pt`` file fails with ENOSPC; other files are written normally."""
    real_open = open

    def open_(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and ".pt." in Path(path).name else f

    monkeypatch.setattr(fileio, "open", open_, raising=False)


FULL_DISK_RUNS = {
    "ft": ("defense:ft", ft(), "defense/ft/defense_result.pt"),
    "attack": ("attack:badnet", [*DIGITS_TRAINING, "--epochs", "2", "--save_folder_name", "full"],
               "checkpoint/train_state.pt"),
    "burn": ("defense:burn", ["--result_file", RECORD, *FAST_BURN], "defense/burn/checkpoint/burn_scan.pt"),
}


@pytest.mark.parametrize("run", sorted(FULL_DISK_RUNS))
def test_a_full_disk_while_torch_saves_is_one_line_and_keeps_every_file(digits_copy, capsys, monkeypatch, run):
    entry, argv, target = FULL_DISK_RUNS[run]
    before = snapshot(digits_copy)
    _disk_full_for_torch_files(monkeypatch)
    line = one_line_error(capsys, entry, argv)
    assert "No space left on device" in line and target in line and "free space" in line, line
    assert ".tmp" not in line  # the file the user knows, not the temporary name
    after = snapshot(digits_copy)
    assert {k: after.get(k) for k in before} == before  # nothing that existed changed or went
    assert not temporaries(digits_copy)
    assert not [k for k in after if k.endswith(Path(target).name)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_torchs_own_zip_writer_error_is_one_line(digits_copy, capsys, monkeypatch):
    """torch's zip writer, writing a path itself, turns ENOSPC into ``RuntimeError: unexpected pos``;
    that error (produced for real here, on /dev/full) is reported as one line too."""
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full"))
    line = one_line_error(capsys, "defense:ft", ft())
    assert "defense_result.pt: torch's file writer stopped" in line and "free space" in line, line
    assert not (digits_copy / "record" / RECORD / "defense" / "ft" / "defense_result.pt").exists()
    assert not temporaries(digits_copy)


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs (a real file system that fills up); skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs privileges)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _leave_free(disk: Path, free_bytes: int) -> None:
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free_bytes))


@pytest.mark.parametrize("free_kb", [0, 8, 64, 160, 320])
def test_a_disk_that_fills_up_anywhere_in_a_run_is_one_line(digits_copy, small_disk, capsys, monkeypatch, free_kb):
    """The run stops wherever the space runs out (the log, index.txt, a CSV, a plot, the result): one
    line, exit 2, the record as it was, no temporary file - or, with enough space, it finishes."""
    shutil.copytree(digits_copy / "record", small_disk / "record")
    monkeypatch.chdir(small_disk)
    record = small_disk / "record" / RECORD
    before = snapshot(record)
    _leave_free(small_disk, free_kb * 1024)
    capsys.readouterr()
    try:
        run_entry("defense:ft", ft())
        finished = True
    except SystemExit as exc:
        assert exc.code == 2
        finished = False
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Logging error" not in err, err
    if not finished:
        assert len(lines) == 1 and "No space left on device" in lines[0], err
        assert not (record / "defense" / "ft" / "defense_result.pt").exists()
    after = snapshot(record)
    assert {k: after.get(k) for k in before} == before
    assert not temporaries(small_disk)
    print(f"{free_kb} KB free: {lines[0] if lines else 'finished'}")  # for `pytest -rP` reports


# ----------------------------------------------------------------------------- names


def test_a_record_with_a_250_character_name_can_be_overwritten(digits_copy):
    name = "r" * 250
    argv = [*DIGITS_TRAINING, "--epochs", "1", "--save_folder_name", name]
    run_entry("attack:badnet", argv)
    first = (digits_copy / "record" / name / "attack_result.pt").read_bytes()
    run_entry("attack:badnet", [*argv, "--overwrite", "true"])
    (old,) = [p for p in (digits_copy / "record").iterdir() if ".replaced-" in p.name]
    assert len(old.name.encode()) <= 255 and old.name.startswith("r" * 200)
    assert (old / "attack_result.pt").read_bytes() == first
    assert (digits_copy / "record" / name / "attack_result.pt").is_file()


# ----------------------------------------------------------------------------- temporary files


HANG_IN_STATE_SAVE = """
import sys, time, torch
real = torch.save
def save(obj, f, *args, **kwargs):
    if ".burn_state.pt." in str(getattr(f, "name", f)):
        print("SAVING", flush=True)
        time.sleep(300)
    return real(obj, f, *args, **kwargs)
torch.save = save
from burnkit.defense import get_defense
get_defense("burn").main(sys.argv[1:])
"""

HOLD_A_TEMPORARY = """
import sys, time
from burnkit.fileio import temp_path
print(temp_path(sys.argv[1]), flush=True)
time.sleep(300)
"""


def test_a_killed_writers_temporary_file_is_removed_and_a_live_writers_is_kept(digits_copy):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["--result_file", RECORD, *FAST_BURN]
    killed = subprocess.Popen([sys.executable, "-c", HANG_IN_STATE_SAVE, *argv], cwd=digits_copy, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = None
    try:
        for line in killed.stdout:  # BURN's log lines, then the marker
            if line.strip() == "SAVING":
                break
        else:
            pytest.fail(killed.stderr.read())
        checkpoints = digits_copy / "record" / RECORD / "defense" / "burn" / "checkpoint"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        (left,) = temporaries(checkpoints)  # what SIGKILL leaves: the state's temporary file
        assert left.name.startswith(".burn_state.pt.")
        live = subprocess.Popen([sys.executable, "-c", HOLD_A_TEMPORARY, str(checkpoints / "burn_state.pt")],
                                cwd=digits_copy, env=env, stdout=subprocess.PIPE, text=True)
        held = Path(live.stdout.readline().strip())
        assert held.is_file()

        run_entry("defense:burn", argv)  # the same command again: it resumes and finishes

        assert not left.exists()
        assert held.exists()  # a running writer's file is never touched
        assert temporaries(digits_copy) == [held]
        assert (checkpoints.parent / "defense_result.pt").is_file()
    finally:
        for proc in (killed, live):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
