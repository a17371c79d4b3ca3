"""Nothing made up from a model that diverged.

* A model whose weights or outputs are NaN/Inf never yields a score or a file that looks finished:
  training that diverges stops in one line naming the learning-rate flag, and a model that overflows
  is refused where it would be scored (records, checkpoints and resources holding NaN/Inf are refused
  on loading: ``tests/test_bad_inputs.py``).

Every case runs a real entry point on the tiny digits records (see conftest).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from burnkit.errors import BurnError
from burnkit.records import write_attack_record, write_defense_result
from burnkit.safe_load import safe_torch_load
from conftest import DIGITS_TRAINING
from test_bad_inputs import RECORD, edit_record, run_entry, snapshot


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
