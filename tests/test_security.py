"""Nothing read from disk runs code, nothing half-made is used as complete, nothing finished is lost.

* A pickle payload (``os.system("touch <marker>")``) is planted in every file the code reads from a
  record folder, a resource cache or a data folder; each entry point that reads it is run, and the
  marker must never appear.
* An archive unpack killed with SIGKILL, then the same command: the full dataset is used.
* A cache built from a partial folder is not served once the folder is complete.
* compare's cells die with compare, and cells orphaned by an older compare are stopped.
* Written files get the umask's permissions; ``--overwrite`` keeps the old output.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from burnkit.attack import get_attack
from burnkit.datasets import load_split
from burnkit.defense import get_defense
from conftest import DIGITS_TRAINING

REPO = Path(__file__).resolve().parents[1]
RECORD = "badnet_digits"
FAST_BURN = ["--iterations", "1", "--epochs", "1", "--max_iter", "5", "--candidates", "3", "--progress", "false"]


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, kind: str = "torch") -> None:
    """Write a payload to ``path``: torch's zip format, or a bare (legacy) pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch":
        torch.save({"model": Payload(marker), "version": 2}, path)
    else:
        path.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=2))


def exit_code(fn, *args) -> int:
    try:
        fn(*args)
    except SystemExit as exc:
        return int(exc.code)
    return 0


def defense(name, *argv):
    return exit_code(get_defense(name).main, list(argv))


def test_a_planted_payload_never_runs(digits_copy, capsys):
    """Every file the code reads from a record folder (and the resource and data files it reads)
    holds a payload in turn; the reading command refuses it in one line, and nothing runs."""
    work = digits_copy
    marker = work / "PWNED"
    rec = work / "record" / RECORD
    burn_ckpt = rec / "defense" / "burn" / "checkpoint"
    results = {}

    def check(name: str, code: int, expected_code: int = 2, text: str = "outside the safe allowlist"):
        err = capsys.readouterr().err
        results[name] = (code, err.strip().splitlines()[-1] if err.strip() else "")
        assert not marker.exists(), f"{name}: the payload ran"
        assert code == expected_code, (name, err)
        if expected_code == 2:
            assert text in err and "Traceback" not in err, (name, err)

    # 1-2. the attack record itself, zip and legacy pickle formats
    original = (rec / "attack_result.pt").read_bytes()
    for kind in ("torch", "pickle"):
        plant(rec / "attack_result.pt", marker, kind)
        check(f"attack_result.pt ({kind})", defense("ft", "--result_file", RECORD, "--epochs", "1"))
    (rec / "attack_result.pt").write_bytes(original)

    # 3. an attack's training checkpoint, read when the same --save_folder_name is run again
    plant(work / "record" / "again" / "checkpoint" / "train_state.pt", marker)
    attack = get_attack("badnet")
    check("checkpoint/train_state.pt",
          exit_code(attack.main, [*DIGITS_TRAINING, "--epochs", "1", "--save_folder_name", "again"]))

    # 4-5. BURN's scan and state checkpoints (resume is on by default)
    plant(burn_ckpt / "burn_scan.pt", marker)
    check("defense/burn/checkpoint/burn_scan.pt", defense("burn", "--result_file", RECORD, *FAST_BURN))
    shutil.rmtree(rec / "defense")
    assert defense("burn", "--result_file", RECORD, *FAST_BURN) == 0  # a real scan checkpoint ...
    (rec / "defense" / "burn" / "defense_result.pt").unlink()  # ... of a run that was cut off
    plant(burn_ckpt / "burn_state.pt", marker)
    check("defense/burn/checkpoint/burn_state.pt", defense("burn", "--result_file", RECORD, *FAST_BURN))
    shutil.rmtree(rec / "defense")

    # 6-7. files no command reads: the runs succeed and nothing runs
    plant(rec / "info.pickle", marker)
    plant(rec / "train_poison_index_list.pickle", marker)
    check("info.pickle + train_poison_index_list.pickle (not read)",
          defense("ft", "--result_file", RECORD, "--epochs", "1", "--progress", "false"), expected_code=0)

    # 8-9. a defense result used as FT-SAM's start and as NAD's teacher
    plant(rec / "defense" / "ft" / "defense_result.pt", marker)
    check("defense/ft/defense_result.pt (FT-SAM --checkpoint_path)",
          defense("ft-sam", "--result_file", RECORD, "--epochs", "1", "--checkpoint_path", f"{RECORD}/defense/ft",
                  "--output_name", "ftsam"))
    check("defense/ft/defense_result.pt (NAD --teacher_model_loc)",
          defense("nad", "--result_file", RECORD, "--te_epochs", "1",
                  "--teacher_model_loc", str(rec / "defense" / "ft" / "defense_result.pt")))

    # 10. a resource: the clean model LF/LC/TrojanNN start from
    from burnkit.resources import clean_model_path
    from burnkit.resources.__main__ import main as resources_main

    plant(clean_model_path("rc", "digits", "smallcnn"), marker)
    check("resource clean_model.pth",
          exit_code(resources_main, ["lf_pattern", "--dataset", "digits", "--model", "smallcnn", "--resource_cache", "rc",
                                     "--progress", "false"]))

    # 11. a CIFAR python batch (the pickles BackdoorBench's torchvision readers use)
    batches = work / "data" / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "test_batch").write_bytes(pickle.dumps({"data": Payload(marker)}, protocol=2))
    with pytest.raises(Exception) as err:
        load_split("cifar10", work / "data" / "cifar10", train=False)
    assert "not a readable CIFAR batch" in str(err.value) and not marker.exists()
    results["cifar-10-batches-py/test_batch"] = (2, str(err.value))

    # 12. a decoded-data cache file holding a pickled object array: never unpickled, rebuilt instead
    cached = _plant_in_cache(work, marker)
    assert cached and not marker.exists()
    results[".burnkit_cache/*.npy"] = (0, "rebuilt from the images")

    assert len(results) == 11
    print(json.dumps({k: v[0] for k, v in results.items()}, indent=1), file=sys.__stdout__)


def _plant_in_cache(work: Path, marker: Path) -> bool:
    """Read a tiny image folder once (which writes its cache), overwrite the cache's image array
    with a pickled object array, and read again: the payload must not run and the images must be
    decoded again. Returns whether the planted file was found and replaced."""
    from PIL import Image

    root = work / "data" / "tiny10" / "cifar10"
    for split in ("train", "test"):
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32, 3), 10 * c, np.uint8)).save(root / split / f"c{c}" / "0.png")
    x1, y1 = load_split("cifar10", root, train=True)
    files = sorted((root / ".burnkit_cache").glob("*.images.npy"))
    for path in files:
        arr = np.empty(1, dtype=object)
        arr[0] = Payload(marker)
        with open(path, "wb") as f:
            np.save(f, arr, allow_pickle=True)
    x2, y2 = load_split("cifar10", root, train=True)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    return bool(files)


# ----------------------------------------------------------------------------- archives and caches


def _archive(path: Path, cifar_root: Path) -> int:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(cifar_root / "train", arcname="train")
        tar.add(cifar_root / "test", arcname="test")
    with tarfile.open(path) as tar:
        return sum(1 for m in tar.getmembers() if m.isfile())


UNPACK_SLOWLY = """
import sys, time, tarfile
from pathlib import Path
real = tarfile.TarFile.extractall
def slow(self, path=".", members=None, **kw):
    members = list(members)
    for i, m in enumerate(members):
        real(self, path, members=[m], **kw)
        if i == len(members) // 3:
            print("HALF", flush=True)
            time.sleep(120)
tarfile.TarFile.extractall = slow
from burnkit.datasets import load_split
load_split("cifar10", Path(sys.argv[1]), train=True, cache=False)
"""


def test_an_unpack_killed_with_sigkill_is_never_used(cifar_root, tmp_path, monkeypatch):
    """kill -9 while the archive is a third unpacked, then the same call: every image is read."""
    archive = tmp_path / "c10.tar.gz"
    n_files = _archive(archive, cifar_root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", UNPACK_SLOWLY, str(archive)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HALF", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = list((tmp_path / "data").glob(".cifar10.partial-*"))
    assert partial and not (tmp_path / "data" / "cifar10").exists()  # the half unpack is not in place
    monkeypatch.chdir(tmp_path)
    x, y = load_split("cifar10", archive, train=True)
    xt, _ = load_split("cifar10", archive, train=False)
    assert len(x) + len(xt) == n_files == 400 and len(x) == 300  # every image of the archive
    assert not list((tmp_path / "data").glob(".cifar10.partial-*"))  # the debris is gone


def test_a_cache_of_a_partial_folder_is_not_served_once_it_is_complete(cifar_root, tmp_path):
    root = tmp_path / "cifar10"
    shutil.copytree(cifar_root, root, ignore=shutil.ignore_patterns(".burnkit_cache"))
    removed = tmp_path / "later"
    removed.mkdir()
    for path in sorted((root / "train" / "airplane").iterdir())[:20]:
        shutil.move(str(path), removed / path.name)
    x, _ = load_split("cifar10", root, train=True)
    assert len(x) == 280
    for path in removed.iterdir():  # the copy completes
        shutil.move(str(path), root / "train" / "airplane" / path.name)
    x, _ = load_split("cifar10", root, train=True)
    assert len(x) == 300
    assert len(list((root / ".burnkit_cache").glob("cifar10-train-*.labels.npy"))) == 1  # the stale one is gone


def test_an_archive_unpacked_from_other_contents_is_refused(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "a.tar.gz"
    _archive(first, cifar_root)
    load_split("cifar10", first, train=False, cache=False)
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        tar.add(cifar_root / "test", arcname="test")
        tar.add(cifar_root / "train", arcname="train")
        data = b"extra"
        info = tarfile.TarInfo("train/airplane/extra.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(Exception, match="was unpacked from another archive"):
        load_split("cifar10", tmp_path / "b.tar.gz", train=False)


# ----------------------------------------------------------------------------- resume and outputs


def test_resume_false_ignores_a_checkpoint_of_other_settings(digits_copy):
    from test_bad_inputs import killed_attack

    killed_attack(digits_copy, "k")
    attack = get_attack("badnet")
    cfg, _ = attack.parse([*DIGITS_TRAINING, "--epochs", "2", "--save_folder_name", "k", "--resume", "false"])
    out = attack.run(cfg)
    assert out["provenance"]["resumed_from_epoch"] == 0
    assert (digits_copy / "record" / "k" / "attack_result.pt").is_file()


def test_overwrite_keeps_the_old_output_renamed(digits_copy):
    args = ["--result_file", RECORD, "--epochs", "1", "--progress", "false"]
    assert defense("ft", *args) == 0
    first = (digits_copy / "record" / RECORD / "defense" / "ft" / "defense_result.pt").read_bytes()
    assert defense("ft", *args) == 2
    assert defense("ft", *args, "--overwrite", "true", "--lr", "0.05") == 0
    (old,) = (digits_copy / "record" / RECORD / "defense").glob("ft.replaced-*")
    assert (old / "defense_result.pt").read_bytes() == first
    assert (digits_copy / "record" / RECORD / "defense" / "ft" / "defense_result.pt").read_bytes() != first


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(digits_copy, umask, mode):
    old = os.umask(umask)
    try:
        assert defense("ft", "--result_file", RECORD, "--epochs", "1", "--progress", "false") == 0
    finally:
        os.umask(old)
    folder = digits_copy / "record" / RECORD / "defense" / "ft"
    for name in ("defense_result.pt", "ft_df.csv", "ft_df_summary.csv", "cost.json"):
        assert (folder / name).stat().st_mode & 0o777 == mode, name


# ----------------------------------------------------------------------------- compare's processes


PARENT = """
import sys, time
from burnkit.compare.executors import CellTask, run_cell
task = CellTask("c", (sys.executable, "-c", "import time; time.sleep(300)"), ".", sys.argv[1], ())
run_cell(task)
"""


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists()


def _alive(pid: int) -> bool:
    from burnkit.compare.executors import _is_zombie, process_start_time

    return process_start_time(pid) is not None and not _is_zombie(pid)


def test_a_cell_dies_with_its_compare(tmp_path):
    log = tmp_path / "cell.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(log)], cwd=tmp_path, env=env)
    pidfile = Path(str(log) + ".pid")
    _wait_for(pidfile)
    child = json.loads(pidfile.read_text())["pid"]
    assert _alive(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_cells_orphaned_by_an_old_compare_are_stopped(tmp_path):
    """A cell left running (as when compare dies where the kernel cannot tie children to it) is
    found through its .pid file and stopped; a .pid file of a finished process is just removed."""
    import socket

    from burnkit.compare.executors import process_start_time, recover_orphans

    logs = tmp_path / "logs"
    logs.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    (logs / "a.log.pid").write_text(json.dumps({"pid": orphan.pid, "host": socket.gethostname(), "cell": "attack/a",
                                                "start": process_start_time(orphan.pid)}))
    (logs / "b.log.pid").write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname(), "cell": "attack/b",
                                                "start": "1"}))
    stopped = recover_orphans(logs, echo=lambda *_: None)
    assert stopped == ["attack/a"]
    assert orphan.wait(timeout=20) == -signal.SIGTERM
    assert not list(logs.glob("*.pid"))


def test_a_killed_run_leaves_no_finished_looking_summary(digits_copy, monkeypatch):
    """A defense killed after its first epoch keeps its per-epoch CSV, but no ``<name>_df_summary.csv``
    whose ``last`` row would pass for the final model (nor a result); an attack killed alike has no
    ``attack_df_summary.csv``."""
    from burnkit import results
    from test_bad_inputs import killed_attack

    real = results.MetricLog.save

    def save_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(results.MetricLog, "save", save_then_die)
    assert defense("ft", "--result_file", RECORD, "--epochs", "3", "--progress", "false") == 130
    folder = digits_copy / "record" / RECORD / "defense" / "ft"
    assert len(pd.read_csv(folder / "ft_df.csv")) == 1
    assert not (folder / "ft_df_summary.csv").exists() and not (folder / "defense_result.pt").exists()
    monkeypatch.setattr(results.MetricLog, "save", real)
    killed_attack(digits_copy, "killed")
    assert (digits_copy / "record" / "killed" / "attack_df.csv").is_file()
    assert not (digits_copy / "record" / "killed" / "attack_df_summary.csv").exists()
