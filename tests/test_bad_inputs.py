"""Bad input, table-driven: every case must exit 2 with ONE line that names the problem, print no
traceback, and leave every file as it was (issue: security and reliability).

Each case runs a real entry point (``Defense.main``, ``Attack.main``, ``burn-compare``) in a fresh copy
of the digits work directory (two real records made by our attacks, see conftest). A case may first
change that copy (``setup``: corrupt a record, plant a checkpoint, make a folder a file); the snapshot of
the whole directory tree (names, sizes, modification times, modes, contents' hashes) is taken after the
setup and compared after the run.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from burnkit.attack import get_attack
from burnkit.compare import main as compare_main
from burnkit.defense import get_defense
from burnkit.detector import get_detector
from burnkit.safe_load import safe_torch_load
from conftest import DIGITS_TRAINING

RECORD = "badnet_digits"
FAST_BURN = ["--iterations", "1", "--epochs", "1", "--max_iter", "5", "--candidates", "3", "--progress", "false"]


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict:
    """Every file and folder under ``root`` with its size, mtime, mode and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_file():
            out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, hashlib.sha1(path.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir", st.st_mode)
    return out


def record_file(work: Path, name: str = RECORD) -> Path:
    return work / "record" / name / "attack_result.pt"


def edit_record(change: Callable[[dict], None], name: str = RECORD):
    """A setup that loads the record (safely), applies ``change`` and saves it back."""
    def setup(work: Path):
        path = record_file(work, name)
        raw = safe_torch_load(path)
        change(raw)
        torch.save(raw, path)
    return setup


def set_key(key, value):
    return edit_record(lambda raw: raw.__setitem__(key, value))


def set_split(key, value, split="bd_train"):
    return edit_record(lambda raw: raw[split].__setitem__(key, value))


def first_entry(raw, split="bd_train"):
    data = raw[split]["bd_data_container"]["data_dict"]
    return data, next(iter(data))


def set_entry(value_fn):
    def change(raw):
        data, key = first_entry(raw)
        data[key] = value_fn(data[key])
    return edit_record(change)


def write_file(rel: str, content: bytes | str):
    def setup(work: Path):
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def both(*setups):
    def setup(work: Path):
        for s in setups:
            s(work)
    return setup


def finished_ft(work: Path):
    """A finished FT output (its files only matter for the refusal)."""
    folder = work / "record" / RECORD / "defense" / "ft"
    folder.mkdir(parents=True)
    torch.save({"model_name": "smallcnn", "num_classes": 10, "model": {}}, folder / "defense_result.pt")
    (folder / "ft_df_summary.csv").write_text(",test_acc\nlast,0.5\n")


def killed_attack(work: Path, name: str = "killed", extra=()):
    """An attack that was interrupted after its first epoch: a checkpoint, no attack_result.pt."""
    from burnkit import engine

    real = engine._save_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    engine._save_checkpoint = save_then_die
    try:
        cls = get_attack("badnet")
        cfg, _ = cls.parse([*DIGITS_TRAINING, "--epochs", "3", "--save_folder_name", name, *extra])
        with pytest.raises(KeyboardInterrupt):
            cls.run(cfg)
    finally:
        engine._save_checkpoint = real
    assert (work / "record" / name / "checkpoint" / "train_state.pt").is_file()


def tar_bytes(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def experiment(spec_change: dict):
    def setup(work: Path):
        spec = {"name": "e", "seeds": [0], "datasets": ["digits"], "models": ["smallcnn"],
                "attacks": ["badnet"], "defenses": ["ft"], **spec_change}
        (work / "e.yaml").write_text(yaml.safe_dump(spec))
    return setup


def poison_weights(value: float, every: bool = True):
    """A setup giving the record's model ``value`` (NaN, Inf) in every weight, or in one weight only."""
    def change(raw):
        floats = [v for v in raw["model"].values() if v.is_floating_point()]
        if every:
            for v in floats:
                v.fill_(value)
        else:
            floats[0].view(-1)[0] = value
    return edit_record(change)


def killed_attack_with_nan_checkpoint(work: Path):
    """An interrupted attack whose checkpoint's weights are NaN (as one saved before the engine stopped
    diverging runs, or damaged since)."""
    killed_attack(work, "killed")
    path = work / "record" / "killed" / "checkpoint" / "train_state.pt"
    state = safe_torch_load(path)
    for v in state["model"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, path)


def huge_png() -> bytes:
    """A PNG whose header says 15,000 x 15,000 pixels (a decompression bomb; no pixel data needed)."""
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 15000, 15000)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


LONG_NAME = "n" * 300  # over the 255 bytes a file name may have


def alias_bomb(levels: int) -> str:
    """``epochs:`` holding ``levels`` nested aliases of nine items each: a few hundred bytes that
    expand to 9**levels values."""
    anchors = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return f"epochs: [{', '.join(anchors)}]\n"


def fake_scripts(folder: str):
    """A setup writing ``<folder>/{attack/badnet,defense/ft}.py`` that would leave PWNED if run."""
    def setup(work: Path):
        for kind, name in (("attack", "badnet"), ("defense", "ft")):
            path = work / folder / kind / f"{name}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("open('PWNED', 'w').close()\n")
    return setup


NOTHING_TO_RUN = {"attacks": {"badnet": {"record_name": RECORD}}, "defenses": {}}  # the record exists


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    entry: str  # "defense:<name>", "attack:<name>", "detector:<name>" or "compare"
    argv: list[str]
    message: str  # a substring of the one error line
    setup: Callable[[Path], None] | None = None


def ft(*argv):
    return ["--result_file", RECORD, "--epochs", "1", "--progress", "false", *argv]


def burn(*argv):
    return ["--result_file", RECORD, *FAST_BURN, *argv]


def quick(*argv):
    """Flags of a cheap run of any issue-14 defense (the case fails before any training)."""
    return ["--result_file", RECORD, "--progress", "false", *argv]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def plant_phase_checkpoint(defense: str, phase: str):
    """A setup leaving a well-formed phase checkpoint of other settings (another lr) in the output folder."""
    def setup(work: Path):
        from burnkit.engine import CHECKPOINT_VERSION

        path = work / "record" / RECORD / "defense" / defense / "checkpoint" / f"{phase}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"version": CHECKPOINT_VERSION, "fingerprint": {"defense": defense, "phase": phase, "lr": 123.0}},
                   path)
    return setup


def badnet(*argv):
    return ["--dataset", "digits", "--model", "smallcnn", "--epochs", "1", "--progress", "false", *argv]


CASES = [
    # --- defense flags
    Case("no-result-file", "defense:ft", ["--epochs", "1"], "--result_file is required"),
    Case("record-missing", "defense:ft", ["--result_file", "nope"], "no attack record at record/nope"),
    Case("dataset-contradicts", "defense:ft", ft("--dataset", "cifar10"), "contradicts the record"),
    Case("dataset-unknown", "defense:ft", ft("--dataset", "imagenet"), "--dataset must be one of"),
    Case("lr-nan", "defense:ft", ft("--lr", "nan"), "--lr must be a finite number"),
    Case("lr-inf", "defense:ft", ft("--lr", "inf"), "must be a finite number"),
    Case("lr-negative", "defense:ft", ft("--lr", "-1"), "--lr must be >= 0"),
    Case("epochs-negative", "defense:ft", ft("--epochs", "-1"), "--epochs must be >= 0"),
    Case("epochs-fraction", "defense:ft", ft("--epochs", "2.5"), "--epochs must be an integer"),
    Case("batch-zero", "defense:ft", ft("--batch_size", "0"), "--batch_size must be >= 1"),
    Case("optimizer-unknown", "defense:ft", ft("--client_optimizer", "foo"), "--client_optimizer must be one of sgd"),
    Case("scheduler-typo", "defense:ft", ft("--lr_scheduler", "CosineAnnealing"), "did you mean 'CosineAnnealingLR'"),
    Case("ratio-zero", "defense:ft", ft("--ratio", "0"), "--ratio must be > 0"),
    Case("ratio-above-one", "defense:ft", ft("--ratio", "2"), "--ratio must be > 0 and <= 1"),
    Case("bool-garbage", "defense:ft", ft("--amp", "maybe"), "--amp must be true or false"),
    Case("flag-typo", "defense:ft", ft("--epoch", "5"), "did you mean '--epochs'"),
    Case("flag-without-value", "defense:ft", ["--result_file", RECORD, "--epochs"], "expected one argument"),
    Case("stray-argument", "defense:ft", ft("extra"), "unexpected argument extra"),
    Case("milestones-not-ints", "defense:ft", ft("--steplr_milestones", "a,b"), "--steplr_milestones must be a list of integers"),
    Case("betas-one-value", "defense:ft", ft("--adam_betas", "0.9"), "--adam_betas must be a list of 2 finite numbers"),
    Case("seed-negative", "defense:ft", ft("--random_seed", "-1"), "--random_seed must be >= 0"),
    Case("test-every-zero", "defense:ft", ft("--test_every", "0"), "--test_every must be >= 1"),
    Case("device-unknown", "defense:ft", ft("--device", "banana"), "is not a device"),
    Case("device-no-gpu", "defense:ft", ft("--device", "cuda:7"), "cuda"),
    Case("model-contradicts", "defense:ft", ft("--model", "preactresnet18"), "contradicts the record's model"),
    Case("output-name-escapes", "defense:ft", ft("--output_name", "../x"), "--output_name must be a plain folder name"),
    Case("output-name-nested", "defense:ft", ft("--output_name", "a/b"), "--output_name must be a plain folder name"),
    Case("index-missing", "defense:ft", ft("--index", "nope.txt"), "--index file nope.txt not found"),
    Case("index-not-numbers", "defense:ft", ft("--index", "idx.txt"), "must hold one integer per line",
         write_file("idx.txt", "one\ntwo\n")),
    Case("index-out-of-range", "defense:ft", ft("--index", "idx.txt"), "outside 0..1436",
         write_file("idx.txt", "5\n99999\n")),
    Case("index-file-repeats", "defense:ft", ft("--index", "idx.txt"), "lists index 0 3 times",
         write_file("idx.txt", "0\n5\n0\n0\n")),
    Case("index-file-empty", "defense:ft", ft("--index", "idx.txt"), "--index file idx.txt is empty",
         write_file("idx.txt", "")),
    Case("log-is-a-file", "defense:ft", ft("--log", "a_file"), "is a file, not a folder", write_file("a_file", "x")),
    Case("defense-folder-is-a-file", "defense:ft", ft(), "is a file, not a folder",
         write_file(f"record/{RECORD}/defense", "x")),
    Case("checkpoint-dir-read-only", "defense:ft", ft("--checkpoint_save", "/sys/burnkit-test"), "is not writable"),
    Case("finished-output", "defense:ft", ft(), "already holds a finished ft result", finished_ft),
    # --- YAML
    Case("yaml-missing", "defense:ft", ft("--yaml_path", "nope.yaml"), "YAML file nope.yaml not found"),
    Case("yaml-key-typo", "defense:burn", burn("--yaml_path", "c.yaml"), "unknown key 'iteratons' (did you mean 'iterations'?)",
         write_file("c.yaml", "iteratons: 5\n")),
    Case("yaml-not-mapping", "defense:ft", ft("--yaml_path", "c.yaml"), "must hold a mapping", write_file("c.yaml", "- a\n")),
    Case("yaml-syntax", "defense:ft", ft("--yaml_path", "c.yaml"), "is not valid YAML at line",
         write_file("c.yaml", "lr: [1, 2\n")),
    Case("yaml-nan", "defense:ft", ft("--yaml_path", "c.yaml"), "'lr' must be a finite number", write_file("c.yaml", "lr: .nan\n")),
    Case("yaml-non-string-key", "defense:ft", ft("--yaml_path", "c.yaml"), "is not a name", write_file("c.yaml", "1: 2\n")),
    Case("yaml-bad-choice", "defense:ft", ft("--yaml_path", "c.yaml"), "'client_optimizer' must be one of",
         write_file("c.yaml", "client_optimizer: rmsprop\n")),
    Case("yaml-alias-bomb", "defense:ft", ft("--yaml_path", "c.yaml"), "aliases that expand to more than",
         write_file("c.yaml", alias_bomb(7))),
    Case("yaml-recursive-alias", "defense:ft", ft("--yaml_path", "c.yaml"), "refers to a value that contains it",
         write_file("c.yaml", "epochs: &a [1, *a]\n")),
    Case("yaml-duplicate-key", "defense:ft", ft("--yaml_path", "c.yaml"),
         "c.yaml: key 'lr' is given twice (lines 1 and 3)",
         write_file("c.yaml", "lr: 0.1\nepochs: 1\nlr: 0.2\n")),
    Case("yaml-not-utf8", "defense:ft", ft("--yaml_path", "c.yaml"), "c.yaml is not UTF-8 text",
         write_file("c.yaml", b"lr: 0.1\n# caf\xe9\n")),
    # --- BURN's own settings and checkpoints
    # --- the defenses that use no clean data (issue 14)
    Case("abl-isolation-zero", "defense:abl", quick("--isolation_ratio", "0"), "--isolation_ratio must be > 0"),
    Case("abl-isolates-nothing", "defense:abl", quick("--isolation_ratio", "0.0001"), "isolates nothing"),
    Case("abl-isolates-everything", "defense:abl", quick("--isolation_ratio", "1"),
         "--isolation_ratio 1.0 isolates all 1437 training samples"),
    Case("abl-ascent-type", "defense:abl", quick("--gradient_ascent_type", "banana"), "--gradient_ascent_type must be one of"),
    Case("abl-other-settings", "defense:abl", quick(), "other settings", setup=plant_phase_checkpoint("abl", "pre_train")),
    Case("abl-corrupt-checkpoint", "defense:abl", quick(), "--resume false",
         setup=lambda w: _write(w / "record" / RECORD / "defense/abl/checkpoint/pre_train.pt", b"not a checkpoint")),
    Case("clp-u-negative", "defense:clp", quick("--u", "-1"), "--u must be >= 0"),
    Case("clp-u-range", "defense:clp", quick("--u_min", "5", "--u_max", "1"), "must not be below --u_min"),
    Case("ep-u-num-fraction", "defense:ep", quick("--u_num", "2.5"), "--u_num must be an integer"),
    Case("ac-analysis", "defense:ac", quick("--cluster_analysis", "distance"), "--cluster_analysis must be one of"),
    Case("ac-one-cluster", "defense:ac", quick("--nb_clusters", "1"), "--nb_clusters must be >= 2"),
    Case("spectral-percentile", "defense:spectral", quick("--percentile", "0"), "--percentile must be > 0"),
    Case("spectral-layer", "defense:spectral", quick("--target_layer", "layer9"), "is not a layer of"),
    Case("spectral-label", "defense:spectral", quick("--target_label", "10"), "is not a class of this record"),
    Case("spectral-other-settings", "defense:spectral", quick(), "other settings",
         setup=plant_phase_checkpoint("spectral", "retrain")),
    Case("d-br-ratios", "defense:d-br", quick("--clean_ratio", "0.9", "--poison_ratio", "0.2"), "must not exceed 1"),
    Case("d-st-temperature", "defense:d-st", quick("--temperature", "0"), "--temperature must be > 0"),
    Case("dbd-epsilon-range", "defense:dbd", quick("--epsilon", "1.5"), "--epsilon must be > 0 and <= 1"),
    Case("dbd-labels-nothing", "defense:dbd", quick("--epsilon", "0.0001"), "labels nothing"),
    Case("burn-share-out-of-range", "defense:burn", burn("--kp_start", "2"), "--kp_start must be in [0, 1]"),
    Case("burn-candidates", "defense:burn", burn("--candidates", "1"), "--candidates 0 (every class) or >= 2"),
    Case("burn-space", "defense:burn", burn("--attack_space", "banana"), "--attack_space must be one of"),
    Case("burn-corrupt-scan", "defense:burn", burn(), "--resume false",
         write_file(f"record/{RECORD}/defense/burn/checkpoint/burn_scan.pt", b"not a torch file")),
    Case("burn-other-settings", "defense:burn", burn(), "other settings",
         write_file(f"record/{RECORD}/defense/burn/checkpoint/burn_scan.pt", b"")),  # replaced in setup below
    # --- records: corrupt files and fields of the wrong type or range
    Case("record-garbage", "defense:ft", ft(), "is corrupt or not a torch file", write_file(f"record/{RECORD}/attack_result.pt", b"garbage")),
    Case("record-truncated", "defense:ft", ft(), "is corrupt or not a torch file"),  # setup below
    Case("record-a-list", "defense:ft", ft(), "holds a list, not a dict"),
    Case("record-lacks-key", "defense:ft", ft(), "missing bd_test", edit_record(lambda raw: raw.pop("bd_test"))),
    Case("num-classes-text", "defense:ft", ft(), "'num_classes' must be an integer", set_key("num_classes", "ten")),
    Case("num-classes-wrong", "defense:ft", ft(), "the record says 100 classes", set_key("num_classes", 100)),
    Case("num-classes-bool", "defense:ft", ft(), "'num_classes' must be an integer", set_key("num_classes", True)),
    Case("img-size-text", "defense:ft", ft(), "'img_size' must be 3 integers", set_key("img_size", "8x8")),
    Case("img-size-short", "defense:ft", ft(), "'img_size' must be 3 integers", set_key("img_size", (8, 8))),
    Case("clean-data-unknown", "defense:ft", ft(), "unknown dataset 'imagenet'", set_key("clean_data", "imagenet")),
    Case("model-name-not-text", "defense:ft", ft(), "'model_name' must be a non-empty string", set_key("model_name", 3)),
    Case("model-not-a-state-dict", "defense:ft", ft(), "'model' is not a state dict", set_key("model", [1, 2])),
    Case("model-other-architecture", "defense:ft", ft(), "do not fit model", set_key("model", {"w": torch.zeros(3)})),
    Case("index-array-text", "defense:ft", ft(), "'original_index_array' must be a 1-D array of integers",
         set_split("original_index_array", ["a", "b"])),
    Case("index-array-float", "defense:ft", ft(), "'original_index_array' must be a 1-D array of integers",
         set_split("original_index_array", np.arange(1437, dtype=np.float64))),
    Case("index-array-out-of-range", "defense:ft", ft(), "original indices outside the poison indicator",
         set_split("original_index_array", np.arange(5000))),
    Case("index-array-repeats", "defense:ft", ft(), "bd_train repeats original index 0 (10 times)",
         set_split("original_index_array", np.r_[np.zeros(10, np.int64), np.arange(1, 1437)])),
    Case("bd-train-empty", "defense:ft", ft(), "bd_train holds no samples",
         set_split("original_index_array", np.zeros(0, np.int64))),
    Case("bd-test-empty", "defense:ft", ft(), "bd_test holds no samples",
         set_split("original_index_array", np.zeros(0, np.int64), split="bd_test")),
    Case("indicator-not-binary", "defense:ft", ft(), "'poison_indicator' must be a 1-D array of 0/1",
         set_split("poison_indicator", np.full(1437, 2.0))),
    Case("indicator-text", "defense:ft", ft(), "'poison_indicator' is not numeric",
         set_split("poison_indicator", ["x"] * 1437)),
    Case("bd-label-out-of-range", "defense:burn", burn(), "the backdoor label 99, outside the 10 classes",
         set_entry(lambda v: {**v, "other_info": [99, v["other_info"][1]]})),
    Case("original-label-negative", "defense:ft", ft(), "the original label -1",
         set_entry(lambda v: {**v, "other_info": [v["other_info"][0], -1]})),
    Case("entry-malformed", "defense:ft", ft(), "malformed data_dict entry", set_entry(lambda v: {"path": v["path"]})),
    Case("entry-label-text", "defense:ft", ft(), "malformed data_dict entry",
         set_entry(lambda v: {**v, "other_info": ["0", "1"]})),
    Case("split-not-dict", "defense:ft", ft(), "bd_test is not a dict", set_key("bd_test", [1])),
    Case("container-missing", "defense:ft", ft(), "lacks 'bd_data_container'",
         edit_record(lambda raw: raw["bd_train"].pop("bd_data_container"))),
    Case("poison-without-image", "defense:ft", ft(), "as poisoned without a stored image",
         edit_record(lambda raw: raw["bd_train"]["bd_data_container"]["data_dict"].pop(first_entry(raw)[1]))),
    Case("png-missing", "defense:ft", ft(), "is missing"),  # setup below
    Case("png-corrupt", "defense:ft", ft(), "is unreadable"),  # setup below
    Case("png-huge", "defense:ft", ft(), "far larger than the dataset's 8x8"),  # setup below
    Case("png-a-link", "defense:ft", ft(), "is a link"),  # setup below
    Case("png-stored-path-elsewhere", "defense:ft", ft(), "is missing"),  # setup below
    Case("record-payload", "defense:ft", ft(), "refers to code outside the safe allowlist"),  # setup below
    # --- non-finite models, folders in the way, names too long, huge trigger images
    Case("record-nan-weights", "defense:ft", ft(), "holds NaN in model[", poison_weights(float("nan"))),
    Case("record-one-inf-weight", "defense:ft", ft(), "holds Inf in model[", poison_weights(float("inf"), every=False)),
    Case("burn-record-nan", "defense:burn", burn(), "holds NaN in model[", poison_weights(float("nan"))),
    Case("burn-record-one-inf", "defense:burn", burn(), "holds Inf in model[", poison_weights(float("inf"), every=False)),
    Case("sau-record-nan", "defense:sau", quick("--epochs", "1"), "holds NaN in model[", poison_weights(float("nan"))),
    Case("clp-record-one-inf", "defense:clp", quick(), "holds Inf in model[", poison_weights(float("inf"), every=False)),
    Case("burn-detector-record-nan", "detector:burn", quick("--max_iter", "5", "--candidates", "2"), "holds NaN in model[",
         poison_weights(float("nan"))),
    Case("spectral-detector-record-one-inf", "detector:spectral", quick(), "holds Inf in model[",
         poison_weights(float("inf"), every=False)),
    Case("resume-nan-checkpoint", "attack:badnet", [*DIGITS_TRAINING, "--save_folder_name", "killed", "--epochs", "3"],
         "training checkpoint record/killed/checkpoint/train_state.pt holds NaN", killed_attack_with_nan_checkpoint),
    Case("burn-state-nan", "defense:burn", burn(), "the BURN checkpoint"),  # setup below
    Case("checkpoint-folder-is-a-file", "defense:ft", ft(), "is a file, not a folder",
         write_file(f"record/{RECORD}/defense/ft/checkpoint", "x")),
    Case("default-log-folder-is-a-file", "defense:ft", ft(), "is a file, not a folder",
         write_file(f"record/{RECORD}/defense/ft/log", "x")),
    Case("attack-checkpoint-folder-is-a-file", "attack:badnet", badnet("--save_folder_name", "t"), "is a file, not a folder",
         write_file("record/t/checkpoint", "x")),
    Case("detector-log-folder-is-a-file", "detector:spectral", quick(), "is a file, not a folder",
         write_file(f"record/{RECORD}/detection/spectral_pretrain/log", "x")),
    Case("save-folder-name-too-long", "attack:badnet", badnet("--save_folder_name", LONG_NAME), "File name too long"),
    Case("output-name-too-long", "defense:ft", ft("--output_name", LONG_NAME), "its name is 300 bytes long"),
    Case("log-name-too-long", "defense:ft", ft("--log", LONG_NAME), "its name is 300 bytes long"),
    Case("result-file-too-long", "defense:ft", ["--result_file", LONG_NAME], "File name too long"),
    Case("trigger-png-bomb", "attack:badnet", badnet("--patch_mask_path", "big.png", "--save_folder_name", "t"),
         "is too large to decode safely", write_file("big.png", huge_png())),
    Case("blended-trigger-png-bomb", "attack:blended", badnet("--attack_trigger_img_path", "big.png", "--save_folder_name", "t"),
         "is too large to decode safely", write_file("big.png", huge_png())),
    Case("lf-pattern-nan", "attack:lf", badnet("--lowFrequencyPatternPath", "p.npy", "--save_folder_name", "t"),
         "holds NaN in the pattern", lambda w: np.save(w / "p.npy", np.full((8, 8, 1), np.nan))),
    # --- attack flags and resumes
    Case("save-folder-escapes", "attack:badnet", badnet("--save_folder_name", "../../x"), "--save_folder_name must be a plain folder name"),
    Case("save-folder-absolute", "attack:badnet", badnet("--save_folder_name", "/tmp/x"), "--save_folder_name must be a plain folder name"),
    Case("record-exists", "attack:badnet", badnet("--save_folder_name", RECORD), "already holds an attack record"),
    Case("pratio-above-one", "attack:badnet", badnet("--pratio", "2"), "--pratio must be >= 0 and <= 1"),
    Case("pratio-nan", "attack:badnet", badnet("--pratio", "nan"), "must be a finite number"),
    Case("target-not-a-class", "attack:badnet", badnet("--attack_target", "99", "--save_folder_name", "t"), "attack_target 99 is not a class"),
    Case("label-mode-unknown", "attack:badnet", badnet("--attack_label_trans", "one2one"), "--attack_label_trans must be one of"),
    Case("model-unknown", "attack:badnet", badnet("--model", "resnet9000", "--save_folder_name", "t"), "resnet9000"),
    Case("subset-negative", "attack:badnet", badnet("--train_subset", "-5"), "--train_subset must be >= 0"),
    Case("attack-optimizer", "attack:badnet", badnet("--client_optimizer", "foo"), "--client_optimizer must be one of"),
    Case("attack-yaml-typo", "attack:badnet", badnet("--bd_yaml_path", "a.yaml"), "a.yaml: unknown key 'patch_mask_pth'",
         write_file("a.yaml", "patch_mask_pth: x.png\n")),
    Case("prototype-yaml-typo", "attack:badnet", badnet("--yaml_path", "p.yaml"), "p.yaml: unknown key 'epochz'",
         write_file("p.yaml", "epochz: 3\n")),
    Case("data-folder-missing", "attack:badnet", ["--dataset", "cifar10", "--model", "smallcnn", "--dataset_path", "nodata",
                                                  "--save_folder_name", "t"], "does not exist"),
    Case("archive-truncated", "attack:badnet", ["--dataset", "cifar10", "--dataset_path", "c.tar.gz", "--save_folder_name", "t"],
         "is truncated or corrupt"),  # setup below
    Case("archive-unsafe", "attack:badnet", ["--dataset", "cifar10", "--dataset_path", "u.tar.gz", "--save_folder_name", "t"],
         "has an unsafe member", write_file("u.tar.gz", tar_bytes({"train/a/1.png": b"x"}, symlink="train/a/2.png"))),
    Case("archive-escapes", "attack:badnet", ["--dataset", "cifar10", "--dataset_path", "e.tar.gz", "--save_folder_name", "t"],
         "has an unsafe member '../evil.png'", write_file("e.tar.gz", tar_bytes({"../evil.png": b"x"}))),
    Case("data-path-not-archive", "attack:badnet", ["--dataset", "cifar10", "--dataset_path", "notes.txt", "--save_folder_name", "t"],
         "is a file but not a .tar", write_file("notes.txt", "hello")),
    Case("resume-other-epochs", "attack:badnet", [*DIGITS_TRAINING, "--save_folder_name", "killed", "--epochs", "5"],
         "was made with other settings (epochs 3 -> 5)", killed_attack),
    Case("record-numpy-strings", "defense:ft", ft(), "holds data outside the safe allowlist",
         set_split("original_index_array", np.array(["a", "b"]))),
    Case("resume-other-model", "attack:badnet", [*DIGITS_TRAINING, "--save_folder_name", "killed", "--epochs", "3",
                                                 "--model", "preactresnet18"],
         "other settings (model 'smallcnn' -> 'preactresnet18')"),  # setup below (a killed smallcnn run)
    Case("resume-corrupt-checkpoint", "attack:badnet", badnet("--save_folder_name", "c", "--epochs", "3"),
         "--resume false", write_file("record/c/checkpoint/train_state.pt", b"\x80\x02garbage")),
    Case("attack-batch-above-set", "attack:badnet", badnet("--batch_size", "5000", "--save_folder_name", "t"),
         "fewer than one batch of 5000"),
    Case("attack-subset-of-3", "attack:badnet", badnet("--train_subset", "3", "--save_folder_name", "t"),
         "the training set has 3 samples"),
    # --- compare
    Case("compare-missing", "compare", ["nope.yaml"], "nope.yaml"),
    Case("compare-unknown-key", "compare", ["e.yaml", "--dry-run"], "unknown key(s) epoch", experiment({"epoch": 3})),
    Case("compare-jobs-zero", "compare", ["e.yaml", "--jobs", "0"], "--jobs must be at least 1", experiment({})),
    Case("compare-executor", "compare", ["e.yaml", "--executor", "banana"], "invalid choice: 'banana'", experiment({})),
    Case("compare-flag-typo", "compare", ["e.yaml", "--dryrun"], "unrecognized arguments: --dryrun", experiment({})),
    Case("compare-unknown-defense", "compare", ["e.yaml", "--dry-run"], "no script for defense nope",
         experiment({"defenses": ["nope"]})),
    Case("compare-bad-override", "compare", ["e.yaml", "--dry-run"], "compare sets per cell",
         experiment({"defense_overrides": {"result_file": "x"}})),
    Case("compare-env-list", "compare", ["e.yaml", "--dry-run"], "env.OMP_NUM_THREADS must be a string, a number",
         experiment({"env": {"OMP_NUM_THREADS": [1, 2]}})),
    Case("compare-custom-python", "compare", ["e.yaml"], "pass --allow-custom-python",
         experiment({"python": "/bin/sh", **NOTHING_TO_RUN})),
    Case("compare-scripts-outside", "compare", ["e.yaml"], "pass --allow-custom-python",
         both(fake_scripts("elsewhere"), experiment({"scripts_root": "elsewhere"}))),
    Case("compare-env-pythonpath", "compare", ["e.yaml"], "env.PYTHONPATH",
         experiment({"env": {"PYTHONPATH": "elsewhere"}, **NOTHING_TO_RUN})),
    Case("compare-submitit-setup", "compare", ["e.yaml", "--executor", "submitit"], "submitit.slurm_setup",
         experiment({"submitit": {"cluster": "local", "slurm_setup": ["touch PWNED"]}, **NOTHING_TO_RUN})),
]


def _late_setups():
    """Setups that need helpers defined above or data of the copy."""
    def truncated(work):
        path = record_file(work)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def a_list(work):
        torch.save([1, 2, 3], record_file(work))

    def first_png(work):
        raw = safe_torch_load(record_file(work))
        data, key = first_entry(raw)
        return work / "record" / RECORD / "bd_train_dataset" / str(data[key]["other_info"][1]) / f"{key}.png"

    def png_missing(work):
        first_png(work).unlink()

    def png_corrupt(work):
        first_png(work).write_bytes(b"not a png")

    def png_huge(work):
        from PIL import Image

        Image.new("L", (1000, 1000)).save(first_png(work))

    def png_link(work):
        own = first_png(work)
        own.unlink()
        other = next((work / "record" / "blended_digits" / "bd_train_dataset").rglob("*.png"))
        own.symlink_to(other)

    def png_stored_elsewhere(work):
        """The record's own PNG is gone; its stored path names another record's image."""
        own = first_png(work)
        own.unlink()
        other = next((work / "record" / "blended_digits" / "bd_train_dataset").rglob("*.png"))
        def store(raw):
            data, key = first_entry(raw)
            data[key]["path"] = str(other.resolve())
        edit_record(store)(work)

    def payload(work):
        torch.save({"model": _Payload(work / "PWNED")}, record_file(work))

    def burn_other_settings(work):
        # a scan checkpoint of this record made with another --max_iter (a real one, from a real run)
        get_defense("burn").main(["--result_file", RECORD, *FAST_BURN, "--max_iter", "6", "--iterations", "0"])
        out = work / "record" / RECORD / "defense" / "burn"
        (out / "defense_result.pt").unlink()  # as if killed before the end

    def burn_state_nan(work):
        get_defense("burn").main(["--result_file", RECORD, *FAST_BURN])
        out = work / "record" / RECORD / "defense" / "burn"
        (out / "defense_result.pt").unlink()  # as if killed before the end
        path = out / "checkpoint" / "burn_state.pt"
        state = safe_torch_load(path)
        next(v for v in state["model"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
        torch.save(state, path)

    def archive_truncated(work):
        data = tar_bytes({f"train/c{i}/{j}.png": os.urandom(2000) for i in range(10) for j in range(5)})
        (work / "c.tar.gz").write_bytes(data[: len(data) // 2])

    def killed_smallcnn(work):
        killed_attack(work, "killed")

    return {"record-truncated": truncated, "record-a-list": a_list, "png-missing": png_missing,
            "png-corrupt": png_corrupt, "png-huge": png_huge,
            "png-a-link": png_link, "png-stored-path-elsewhere": png_stored_elsewhere, "record-payload": payload,
            "burn-other-settings": burn_other_settings, "archive-truncated": archive_truncated,
            "resume-other-model": killed_smallcnn, "burn-state-nan": burn_state_nan}


class _Payload:
    """Unpickling this would create ``marker`` (via os.system): it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


for _case in CASES:
    _case.setup = _late_setups().get(_case.id, _case.setup)


def run_entry(entry: str, argv: list[str]):
    if entry == "compare":
        return compare_main(argv)
    kind, name = entry.split(":")
    cls = {"defense": get_defense, "attack": get_attack, "detector": get_detector}[kind](name)
    return cls.main(argv)


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, digits_copy, capsys, recwarn):
    work = digits_copy
    if case.setup is not None:
        case.setup(work)
        capsys.readouterr()
    recwarn.clear()
    before = snapshot(work)
    with pytest.raises(SystemExit) as exit_info:
        run_entry(case.entry, case.argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0]
    assert case.message in lines[0], lines[0]
    assert not [str(w.message) for w in recwarn], "a warning would be a second line"
    assert snapshot(work) == before
    assert not (work / "PWNED").exists()
    print(f"{case.id}: {lines[0]}")  # the message, for `pytest -rP` reports
