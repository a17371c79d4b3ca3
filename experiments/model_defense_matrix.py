"""Every zoo model x {BURN (1 iteration), FT, FP, NAD, ANP, I-BAU, FT-SAM, SAU}: ok or its one-line refusal.

For each model a tiny BadNets record is made (1 epoch on 3 images per class, pratio 0.1, target 0,
batch 8) on a 30-image CIFAR-10 subset taken from the CIFAR-10 image-folder archive (``--tarball``, else
$BURN_CIFAR10_TARBALL; docs/testing.md says how to get one), or - for a model whose
pooling needs more than 32 px (AlexNet) - on the same images upsampled to 64 px and written in
Tiny-ImageNet's official layout. Each defense then runs on the record through its own CLI code path
with budgets cut to one epoch/round/iteration. A cell is ``ok`` (the defense wrote its result), or
the one-line error a user would see (``BurnError``: a refusal where the method does not apply), or
``FAILED`` with the exception (a bug). This measures that every combination runs, not how well.

Every cell runs in its own process (a cell the kernel kills for memory is a ``FAILED`` cell with the
process's peak resident memory, not the end of the matrix); the record too. Resumable: every
finished cell is ``<work>/cells/<model>__<defense>.json``; a re-run skips them (``FAILED`` cells are
retried, on the model's existing record; ``--recompute_stale`` also recomputes cells made at another
git revision, on a record re-made at this one). Each defense's weight files are deleted after its cell (``--keep_weights``
keeps them). The table goes to ``--table`` (markdown); ``--render_only`` writes it from the cell
files without computing anything.

    cd /work/wt12 && OMP_NUM_THREADS=1 PYTHONPATH=. nice python experiments/model_defense_matrix.py \\
        --work /work/runs/wt12/matrix --table docs/model-defense-matrix.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

import attack_models
from burnkit.attack import get_attack
from burnkit.defense import get_defense
from burnkit.errors import BurnError
from burnkit.results import git_revision

DEFENSES = ["burn", "ft", "fp", "nad", "anp", "i-bau", "ft-sam", "sau"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 1
COMMON = ["--batch_size", "8", "--ratio", "0.34", "--progress", "false", "--overwrite", "true", "--device", "cpu"]
BUDGETS = {  # one epoch / round / iteration each, on the 10-image clean subset (ratio 0.34 of 30)
    # the premise test would (rightly) stop BURN before Phase 1 on a 1-epoch 30-image record; off, so that
    # both fine-tunings run on every model
    "burn": ["--iterations", "1", "--epochs", "1", "--scan_batch_size", "8", "--max_iter", "5", "--candidates", "4",
             "--kp_start", "0.1", "--kp_end", "0.2", "--kc_start", "0.2", "--kc_end", "0.4", "--premise_check", "false"],
    "ft": ["--epochs", "1"],
    "fp": ["--epochs", "1", "--once_prune_ratio", "0.05"],
    "nad": ["--te_epochs", "1"],
    "anp": ["--nb_iter", "1", "--print_every", "1", "--pruning_step", "0.3"],
    "i-bau": ["--n_rounds", "1", "--K", "2"],
    "ft-sam": ["--epochs", "1"],
    "sau": ["--n_rounds", "1", "--adv_steps", "2"],
}
# Per-model flags after the common ones. ViT-L/16 at batch 8: BURN's fine-tuning holds the weights,
# their gradients and Adam's two moments (4 x 1.2 GB) plus ~4 GB of activations, more than this 24 GB
# machine had free beside the other jobs (the kernel killed the cell); at batch 2 the activations are
# a quarter. A user on a small machine does the same (the defenses name their batch-size flags).
MODEL_FLAGS = {"vit_l_16": {"*": ["--batch_size", "2"], "burn": ["--scan_batch_size", "2"]}}
TINY_WNIDS = [f"n{9000000 + i:08d}" for i in range(10)]
REVISION = git_revision()  # the code the cells of this invocation ran


def build_data(work: Path, tarball: Path | None) -> None:
    """``data/cifar10/{train,test}/<class>/*.jpg`` (3 + 1 per class) and the same images at 64 px as
    ``data/tiny/tiny-imagenet-200`` (wnids.txt, train/<wnid>/images, val/images + val_annotations.txt)."""
    cifar = work / "data" / "cifar10"
    if not (cifar / "test").is_dir():
        keep = {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}
        counts: dict[tuple[str, str], int] = {}
        members = []
        with tarfile.open(tarball) as tar:
            for m in tar:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 3 or parts[-3] not in keep:
                    continue
                split, cls = parts[-3], parts[-2]
                if counts.get((split, cls), 0) < keep[split]:
                    counts[(split, cls)] = counts.get((split, cls), 0) + 1
                    m.name = f"{split}/{cls}/{parts[-1]}"
                    members.append(m)
            tar.extractall(cifar, members=members, filter="data")
    tiny = work / "data" / "tiny" / "tiny-imagenet-200"
    if (tiny / "val" / "val_annotations.txt").is_file():
        return
    classes = sorted(p.name for p in (cifar / "train").iterdir())
    (tiny / "val" / "images").mkdir(parents=True, exist_ok=True)
    (tiny / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    annotations = []
    for wnid, cls in zip(TINY_WNIDS, classes):
        (tiny / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
        for j, path in enumerate(sorted((cifar / "train" / cls).iterdir())):
            Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR).save(
                tiny / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", format="JPEG", quality=95)
        for j, path in enumerate(sorted((cifar / "test" / cls).iterdir())):
            name = f"val_{len(annotations)}.JPEG"
            Image.open(path).convert("RGB").resize((64, 64), Image.BILINEAR).save(
                tiny / "val" / "images" / name, format="JPEG", quality=95)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (tiny / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")


def dataset_for(model: str) -> str:
    try:
        size = attack_models.min_input_size(model)
    except attack_models.UnknownModelError:
        return "cifar10"
    return "tiny" if 32 < size <= 64 else "cifar10"


def run_cell(fn) -> dict:
    """Run ``fn``; classify the outcome as ok / refused (BurnError's one line) / FAILED."""
    started = time.perf_counter()
    try:
        out = fn()
        status, message = "ok", ""
    except BurnError as err:
        out, status, message = None, "refused", " ".join(str(err).split())
    except Exception as err:  # noqa: BLE001 - a bug: keep its traceback for the log
        out, status, message = None, "FAILED", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        traceback.print_exc()
    return {"status": status, "message": message, "wall_s": round(time.perf_counter() - started, 1), "out": out}


def make_record(model: str, dataset: str) -> dict:
    name = f"mx_{model}"
    attack = get_attack("badnet")
    cfg, _ = attack.parse(["--dataset", dataset, "--model", model, "--epochs", "1", "--batch_size", "8",
                           "--pratio", "0.1", "--save_folder_name", name, "--progress", "false",
                           "--overwrite", "true", "--device", "cpu"])
    cell = run_cell(lambda: attack.run(cfg))
    cell.pop("out")
    return {**cell, "record": name}


def defense_flags(model: str, defense: str) -> list[str]:
    extra = MODEL_FLAGS.get(model, {})
    return [*COMMON, *BUDGETS[defense], *extra.get("*", []), *extra.get(defense, [])]


def run_defense(defense: str, record: str) -> dict:
    cls = get_defense(defense)

    def go():
        cfg, _, ignored = cls.parse(["--result_file", record, *defense_flags(record.removeprefix("mx_"), defense)])
        result = cls().run(cfg, ignored_keys=ignored)
        return {k: result["final"].get(k) for k in ("test_acc", "test_asr", "test_ra")}

    cell = run_cell(go)
    cell["final"] = cell.pop("out")
    return cell


def drop_weights(folder: Path) -> None:
    """Delete a finished cell's weight files (``*.pt``: the result and its checkpoints) and the folders
    ``--overwrite`` moved aside: the cell's JSON keeps what the matrix measures, and the weights of
    8 defenses x 29 models (a ViT-L's are 1.2 GB each) would fill the disk."""
    if not folder.is_dir():
        return
    for path in folder.rglob("*.pt"):
        path.unlink()
    for old in folder.parent.glob(f"{folder.name}.replaced-*"):
        shutil.rmtree(old)


def mem_total_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def run_isolated(work: Path, args: list[str], label: str) -> dict:
    """One cell in a child process, so that a cell the kernel kills for memory (a large model on a
    shared CPU machine gets SIGKILL, not a Python error) is reported and the matrix goes on. The
    child's peak resident memory (``wait4``'s ``ru_maxrss``, also for a killed child) is recorded."""
    out = work / "cells" / f".{label}.child.json"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--cell", *args,
                             str(out)], cwd=work)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    peak_mb = round(usage.ru_maxrss / 1024)  # Linux: kilobytes
    if code == 0 and out.is_file():
        cell = json.loads(out.read_text())
        out.unlink()
        return {**cell, "peak_rss_mb": peak_mb}
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    hint = (f" (SIGKILL: the kernel's out-of-memory killer, at {peak_mb} MB resident of the machine's "
            f"{mem_total_mb()} MB, shared with other processes)") if code == -9 else ""
    return {"status": "FAILED", "message": f"the cell's process ended with {how}{hint}", "wall_s": None,
            "final": None, "peak_rss_mb": peak_mb}


def matrix(work: Path, models: list[str], defenses: list[str], recompute_stale: bool = False,
           keep_weights: bool = False) -> dict:
    """Run the missing cells (and ``FAILED`` ones; with ``recompute_stale`` also those computed at
    another git revision) and return every cell of ``models`` x ``defenses``."""
    cells_dir = work / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with contextlib.chdir(work):
        for model in models:
            dataset = dataset_for(model)
            results[model] = {"dataset": dataset, "defenses": {}}
            attack_cell = None
            for defense in defenses:
                path = cells_dir / f"{model}__{defense}.json"
                if path.is_file():
                    cell = json.loads(path.read_text())
                    stale = recompute_stale and cell.get("git") != REVISION
                    if cell["status"] != "FAILED" and not stale:
                        results[model]["defenses"][defense] = cell
                        continue
                if attack_cell is None and not recompute_stale and (
                        work / "record" / f"mx_{model}" / "attack_result.pt").is_file():
                    attack_cell = {"status": "ok", "message": "", "wall_s": None, "peak_rss_mb": None}  # reused
                    print(f"[matrix] {model} on {dataset}: the existing record", flush=True)
                if attack_cell is None:  # a record of this revision's attack, made once per invocation
                    attack_cell = run_isolated(work, ["attack", model, dataset], f"{model}__attack")
                    attack_cell.pop("final", None)
                    for old in (work / "record").glob(f"mx_{model}.replaced-*"):
                        shutil.rmtree(old)  # the record of an earlier revision, with its defense outputs
                    print(f"[matrix] {model} on {dataset}: record {attack_cell['status']} ({attack_cell['wall_s']}s, "
                          f"peak {attack_cell['peak_rss_mb']} MB) {attack_cell['message']}", flush=True)
                if attack_cell["status"] != "ok":
                    cell = {"status": "no record", "message": attack_cell["message"], "wall_s": 0.0}
                else:
                    cell = run_isolated(work, ["defense", defense, f"mx_{model}"], f"{model}__{defense}")
                    if not keep_weights:
                        drop_weights(work / "record" / f"mx_{model}" / "defense" / defense)
                cell["git"] = REVISION
                path.write_text(json.dumps(cell, indent=1) + "\n")
                results[model]["defenses"][defense] = cell
                print(f"[matrix] {model} x {defense}: {cell['status']} ({cell['wall_s']}s, peak "
                      f"{cell.get('peak_rss_mb')} MB) {cell['message']}", flush=True)
    return results


def collect(work: Path, models: list[str], defenses: list[str]) -> dict:
    """The cells on disk, computing nothing (a missing cell is shown as ``not run``)."""
    missing = {"status": "not run", "message": "", "wall_s": None}
    return {model: {"dataset": dataset_for(model), "defenses": {
        d: json.loads(p.read_text()) if (p := work / "cells" / f"{model}__{d}.json").is_file() else dict(missing)
        for d in defenses}} for model in models}


def commit_time(rev: str) -> int:
    """Seconds since the epoch of a commit (0 if unknown), to list revisions in order."""
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        out = subprocess.run(["git", "show", "-s", "--format=%ct", rev], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return int(out.stdout.strip() or 0)
    return 0


def write_table(results: dict, defenses: list[str], path: Path, command: str) -> None:
    notes: list[str] = []

    def note(message: str) -> str:
        if message not in notes:
            notes.append(message)
        return f"[{notes.index(message) + 1}]"

    cells_all = [row["defenses"][d] for row in results.values() for d in defenses]
    revisions: dict[str, int] = {}
    for cell in cells_all:
        if cell["status"] != "not run":
            revisions[str(cell.get("git"))] = revisions.get(str(cell.get("git")), 0) + 1
    dated = sorted(revisions, key=commit_time)
    newest = max(revisions, key=revisions.get)  # unmarked: the revision most cells were computed at
    older = {rev: chr(ord("a") + i) for i, rev in enumerate(r for r in dated if r != newest)}

    lines = ["| model | data | " + " | ".join(defenses) + " |", "|---|---|" + "---|" * len(defenses)]
    counts: dict[str, int] = {}
    for model, row in results.items():
        cells = []
        for defense in defenses:
            cell = row["defenses"][defense]
            counts[cell["status"]] = counts.get(cell["status"], 0) + 1
            peak = cell.get("peak_rss_mb")
            cost = ", ".join(x for x in (f"{cell['wall_s']:.0f} s" if cell.get("wall_s") else "",
                                         f"{peak / 1024:.1f} GB" if peak else "") if x)
            if cell["status"] == "ok":
                text = f"ok ({cost})"
            elif cell["status"] == "not run":
                text = "not run"
            else:
                text = f"{cell['status']} " + note(cell["message"]) + (f" ({cost})" if cell["status"] == "FAILED" and cost else "")
            rev = str(cell.get("git"))
            if cell["status"] != "not run" and rev != newest:
                text += f" <sup>{older[rev]}</sup>"
            cells.append(text)
        lines.append(f"| {model} | {row['dataset']} | " + " | ".join(cells) + " |")
    total_s = sum(c.get("wall_s") or 0 for c in cells_all)
    body = [
        "# Model x defense matrix",
        "",
        "Every zoo model against every defense on a tiny BadNets record of its own: `ok` = the defense ran "
        "through its CLI code path and wrote `defense_result.pt`; `refused [n]` = the one-line error a user "
        "gets (note n); `no record [n]` = the attack itself refused the model for the dataset; `FAILED` = a "
        "bug or the process was killed (note n says which); `not run` = no cell computed yet. Each cell runs in "
        "its own process with one thread (`OMP_NUM_THREADS=1`) on a 2-core CPU shared with other work: the "
        "time is the defense's wall seconds (evaluations included), the memory the process's peak resident "
        f"set (`ru_maxrss`, blank for cells computed before the script recorded it). Machine memory: {mem_total_mb()} MB. "
        "This shows that each combination runs, not how well it defends: the records are 1-epoch models on "
        f"{TRAIN_PER_CLASS * 10} training images ({TEST_PER_CLASS * 10} test images).",
        "",
        f"Made by `{command}` (torch {torch.__version__}, {platform.node()}; table written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {total_s / 60:.0f} min of cell wall time in all). "
        "Cells computed at git " + ", ".join(
            (f"<sup>{older[r]}</sup> " if r in older else "unmarked ") + f"{r} ({revisions[r]} cell{'s' if revisions[r] > 1 else ''}, committed "
            f"{time.strftime('%H:%M', time.gmtime(commit_time(r)))} UTC)" for r in dated)
        + f", in commit order; the table's code is {REVISION}. A re-run computes missing and `FAILED` cells only (`--recompute_stale` also those of other "
        "revisions; delete `<dir>/cells/<model>__<defense>.json` to recompute one); `--render_only` rewrites "
        "this table from the cell files.",
        "",
        "Data: `cifar10` = 3 train / 1 test JPEG per class from the CIFAR-10 image-folder archive (docs/testing.md); `tiny` = the same "
        "images upsampled to 64 px in Tiny-ImageNet's official layout (for AlexNet, which needs >= 63 px). "
        "Attack: `attack/badnet.py --epochs 1 --batch_size 8 --pratio 0.1`. Defense flags (all: "
        f"`{' '.join(COMMON)}`):",
        "",
        *[f"* {d}: `{' '.join(BUDGETS[d])}`" for d in defenses],
        *[f"* {model} only, added: " + "; ".join(f"{d if d != '*' else 'every defense'} `{' '.join(f)}`"
                                               for d, f in extra.items()) for model, extra in MODEL_FLAGS.items()],
        "",
        f"Cells: {', '.join(f'{v} {k}' for k, v in counts.items() if v)}.",
        "",
        *lines,
        "",
        "Notes:",
        "",
        *[f"{i + 1}. {message}" for i, message in enumerate(notes)],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="work folder (data/, record/, cells/)")
    p.add_argument("--tarball", type=Path, default=os.environ.get("BURN_CIFAR10_TARBALL"),
                   help="the CIFAR-10 image-folder archive (default: $BURN_CIFAR10_TARBALL; docs/testing.md)")
    p.add_argument("--models", default="", help="comma list (default: every zoo model + resnext29, senet18)")
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--table", type=Path, default=None, help="markdown output (default <work>/matrix.md)")
    p.add_argument("--recompute_stale", action="store_true", help="also recompute cells of other git revisions")
    p.add_argument("--render_only", action="store_true", help="write the table from the cell files, compute nothing")
    p.add_argument("--keep_weights", action="store_true", help="keep each defense's *.pt files (default: deleted)")
    p.add_argument("--cell", nargs=4, metavar=("KIND", "NAME", "ARG", "OUT"), help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.cell:
        kind, name, arg, out = args.cell
        with contextlib.chdir(args.work):
            cell = make_record(name, arg) if kind == "attack" else run_defense(name, arg)
        Path(out).write_text(json.dumps(cell, default=str) + "\n")
        return
    data_made = (args.work / "data" / "cifar10" / "test").is_dir()  # by an earlier run: no archive needed
    if not args.render_only and not data_made and (args.tarball is None or not Path(args.tarball).is_file()):
        p.error(f"no CIFAR-10 image-folder archive at {args.tarball}; pass --tarball PATH or set BURN_CIFAR10_TARBALL "
                "(docs/testing.md)" if args.tarball else "give the CIFAR-10 image-folder archive: --tarball PATH or "
                "BURN_CIFAR10_TARBALL (docs/testing.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",") if args.models else attack_models.list_models() + sorted(attack_models.NOT_BUILDABLE)
    defenses = args.defenses.split(",")
    table = (args.table or args.work / "matrix.md").resolve()
    if args.render_only:
        results = collect(args.work.resolve(), models, defenses)
    else:
        build_data(args.work.resolve(), Path(args.tarball) if args.tarball else None)
        results = matrix(args.work.resolve(), models, defenses, args.recompute_stale, args.keep_weights)
        (args.work / "matrix.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    command = "OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/model_defense_matrix.py --work <dir>"
    if args.table:
        command += f" --table {args.table}"
    write_table(results, defenses, table, command)
    print(f"[matrix] table -> {table}")


if __name__ == "__main__":
    main()
