"""Benchmark (not a test): burnkit's boundary scan vs torchattacks.DeepFool and foolbox's
L2DeepFoolAttack on the same model and the same samples, in one process.

All three run in [0, 1] pixel space on the Classifier (normalisation inside the model), with the
same overshoot, step limit and candidate count, starting from the model's own prediction (the label
handed to the two libraries is the clean prediction, which is what our attack moves away from).
Reported: samples per second, median L2 of the final perturbation, success rate, and the ratios.

Needs the benchmark-only extras (never runtime dependencies; setup.py's ``bench`` extra):
    pip install -e .[bench]    # or: pip install torchattacks foolbox, e.g. into a venv with --system-site-packages

Example:
    PYTHONPATH=. .venv-bench/bin/python benchmarks/bench_boundary.py \
        --result_file record/badnet_smallcnn_c10 --dataset_path ./data --n 256
    ... --device cuda    # on a GPU: the headline ratios are then per wall-second
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from burnkit.boundary import boundary_attack, scan
from burnkit.datasets import dataset_info
from burnkit.defense import resolve_record_dir
from burnkit.engine import device_description
from burnkit.models import build_classifier, load_bb_state_dict
from burnkit.records import read_attack_record
from burnkit.safe_load import safe_torch_load


def load_model_and_samples(args):
    """The record's model and ``n`` seeded samples of its poisoned training set (what BURN scans),
    or a randomly initialised ``--arch`` on random CIFAR-sized inputs when no record is given."""
    if args.result_file:
        record = read_attack_record(resolve_record_dir(args.result_file))  # a name under record/ or a path
        clf = build_classifier(record.model_name, record.info, record.num_classes)
        load_bb_state_dict(clf, record.state_dict)
        train = record.load_data(args.dataset_path).bd_train
        gen = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(len(train), generator=gen)[:args.n]
        x01 = train.images[pick].float() / 255
        poison = train.poison[pick]
        return clf.eval(), x01, poison, f"{record.model_name} from {args.result_file}"
    clf = build_classifier(args.arch, dataset_info("cifar10"))
    gen = torch.Generator().manual_seed(args.seed)
    what = f"{args.arch} (random init)"
    if args.weights:  # e.g. an attack's training checkpoint: {"model": Classifier state dict}
        state = safe_torch_load(args.weights, what="--weights")
        state = state.get("model", state)
        load_bb_state_dict(clf, {k.removeprefix("net."): v for k, v in state.items()})
        what = f"{args.arch} weights from {args.weights}"
    if args.dataset_path and Path(args.dataset_path).exists():
        from burnkit.datasets import load_split, resolve_data_root

        images, _ = load_split("cifar10", resolve_data_root(args.dataset_path, "cifar10"), train=False)
        pick = torch.randperm(len(images), generator=gen)[:args.n]
        x01 = torch.from_numpy(images[pick.numpy()]).permute(0, 3, 1, 2).float() / 255
        return clf.eval(), x01, torch.zeros(args.n, dtype=torch.bool), what + ", CIFAR-10 test images"
    return clf.eval(), torch.rand(args.n, 3, 32, 32, generator=gen), torch.zeros(args.n, dtype=torch.bool), \
        what + ", uniform random images"


def run_ours(clf, x01, args, backward="per_class", candidates=None, reforward=True):
    res = scan(clf, x01, batch_size=args.batch_size, lower=0.0, upper=1.0, overshoot=args.overshoot,
               max_iter=args.steps, candidates=candidates or args.candidates, progress=False, backward=backward,
               reforward=reforward)
    return res.l2, res.converged


def run_foolbox(clf, x01, labels, args):
    import foolbox as fb

    fmodel = fb.PyTorchModel(clf, bounds=(0, 1))
    attack = fb.attacks.L2DeepFoolAttack(steps=args.steps, candidates=args.candidates,
                                         overshoot=args.overshoot, loss="logits")
    l2s, ok = [], []
    for start in range(0, len(x01), args.batch_size):
        x, y = x01[start:start + args.batch_size], labels[start:start + args.batch_size]
        _, clipped, success = attack(fmodel, x, y, epsilons=None)
        l2s.append((clipped - x).flatten(1).norm(dim=1))
        ok.append(success)
    return torch.cat(l2s), torch.cat(ok)


def run_torchattacks(clf, x01, labels, args):
    import torchattacks

    atk = torchattacks.DeepFool(clf, steps=args.steps, overshoot=args.overshoot)
    l2s, ok = [], []
    for start in range(0, len(x01), args.batch_size):
        x, y = x01[start:start + args.batch_size], labels[start:start + args.batch_size]
        adv = atk(x, y)
        l2s.append((adv - x).flatten(1).norm(dim=1))
        with torch.no_grad():
            ok.append(clf(adv).argmax(1) != y)
    clf.zero_grad(set_to_none=True)  # torchattacks leaves parameter gradients behind
    return torch.cat(l2s), torch.cat(ok)


def timed(fn, *a):
    """Result, wall seconds and CPU seconds of this process (the fair measure on a shared machine
    when every run uses the same single thread). On CUDA the device is synchronised around the call,
    so the wall time includes the queued kernels."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*a)
    sync()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def median(t: torch.Tensor) -> float:
    return float(t.median()) if len(t) else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result_file", default=None, help="attack record: a folder name under record/ or a path (else random-init --arch)")
    p.add_argument("--dataset_path", default="./data")
    p.add_argument("--arch", default="smallcnn")
    p.add_argument("--weights", default=None, help="state dict / training checkpoint for --arch (no record)")
    p.add_argument("--n", type=int, default=256, help="samples for ours and foolbox")
    p.add_argument("--n_torchattacks", type=int, default=None, help="first samples for torchattacks (default: n; 0 = skip it)")
    p.add_argument("--batched", type=int, default=1, help="also time the is_grads_batched backward (0 = skip)")
    p.add_argument("--no_reforward", type=int, default=1, help="also time the scan without re-forwarding (0 = skip)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--overshoot", type=float, default=0.02)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; compare samples per wall-second there")
    p.add_argument("--fast_candidates", type=int, default=0, help="also run ours with this many candidates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/boundary.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_boundary.py: --device cuda but torch sees no CUDA device; use --device cpu")
    clf, x01, poison, what = load_model_and_samples(args)
    clf, x01 = clf.to(device), x01.to(device)
    with torch.no_grad():
        labels = clf(x01).argmax(1)
    n_ta = min(args.n if args.n_torchattacks is None else args.n_torchattacks, args.n)
    boundary_attack(clf, x01[:8], lower=0.0, upper=1.0, max_iter=2)  # warm-up

    rows = []  # (name, samples, wall s, cpu s, l2, success)
    (l2, ok), t, c = timed(run_ours, clf, x01, args)
    rows.append(("burnkit scan (per_class backward)", len(x01), t, c, l2, ok))
    if args.no_reforward:
        (l2_r, ok_r), t_r, c_r = timed(run_ours, clf, x01, args, "per_class", None, False)
        rows.append(("burnkit scan (no re-forward: backward through finished samples)", len(x01), t_r, c_r, l2_r, ok_r))
    if args.batched:
        (l2_b, ok_b), t_b, c_b = timed(run_ours, clf, x01, args, "batched")
        rows.append(("burnkit scan (batched backward)", len(x01), t_b, c_b, l2_b, ok_b))
    if args.fast_candidates:
        (l2_f, ok_f), t_f, c_f = timed(run_ours, clf, x01, args, "per_class", args.fast_candidates)
        rows.append((f"burnkit scan (top-{args.fast_candidates} candidates)", len(x01), t_f, c_f, l2_f, ok_f))
    (l2_fb, ok_fb), t_fb, c_fb = timed(run_foolbox, clf, x01, labels, args)
    rows.append(("foolbox 3 L2DeepFoolAttack", len(x01), t_fb, c_fb, l2_fb, ok_fb))
    if n_ta:
        (l2_ta, ok_ta), t_ta, c_ta = timed(run_torchattacks, clf, x01[:n_ta], labels[:n_ta], args)
        rows.append(("torchattacks DeepFool", n_ta, t_ta, c_ta, l2_ta, ok_ta))

    import foolbox

    versions = f"foolbox {foolbox.__version__}"
    if n_ta:
        import torchattacks

        versions += f", torchattacks {torchattacks.__version__}"

    def speedup(count, secs, ref_count, ref_secs):
        return (count / secs) / (ref_count / ref_secs)

    lines = [
        "# Boundary scan benchmark",
        "",
        "Command: `PYTHONPATH=. python benchmarks/bench_boundary.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        "",
        f"Hardware: {device_description(device)}, {platform.processor() or platform.machine()}; "
        f"torch {torch.__version__}, {versions}, "
        f"python {platform.python_version()}. The machine is shared: wall times depend on the other "
        "load, CPU seconds of this single-threaded process do not (ratios use both).",
        f"Model: {what}. Samples: {len(x01)} seeded draws ({int(poison.sum())} poisoned)"
        + (f"; torchattacks on the first {n_ta} of them." if n_ta else "."),
        f"Settings (all): pixel space [0, 1] with clipping, overshoot {args.overshoot}, max {args.steps} steps, "
        f"{args.candidates} candidate classes{' (torchattacks: always all)' if n_ta else ''}, batch {args.batch_size}, "
        "labels = clean predictions.",
        "",
        "| attack | samples | wall s | CPU s | samples/CPU-s | median L2 (successful) | success |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, count, secs, cpu, l2s, oks in rows:
        lines.append(f"| {name} | {count} | {secs:.2f} | {cpu:.2f} | {count / cpu:.2f} | "
                     f"{median(l2s[oks]):.4f} | {float(oks.float().mean()):.3f} |")
    both = ok & ok_fb
    paired = float((l2[both] / l2_fb[both].clamp_min(1e-12)).median()) if both.any() else float("nan")
    # the headline ratio: CPU seconds on a CPU (robust to other load), wall seconds on a GPU (host CPU time
    # there only measures kernel launches)
    on_gpu = device.type == "cuda"
    head, other = ("wall", "CPU-s") if on_gpu else ("CPU-s", "wall")

    def ratio(count, wall_s, cpu_s, ref_count, ref_wall, ref_cpu, fmt):
        main_r = speedup(count, wall_s, ref_count, ref_wall) if on_gpu else speedup(count, cpu_s, ref_count, ref_cpu)
        side_r = speedup(count, cpu_s, ref_count, ref_cpu) if on_gpu else speedup(count, wall_s, ref_count, ref_wall)
        return f"**{main_r:{fmt}}x** samples/{head} ({side_r:{fmt}}x per {other})"

    l2_ratio = median(l2[ok]) / median(l2_fb[ok_fb])
    lines += [
        "",
        f"Same settings ({args.candidates} candidates; burnkit per_class backward):",
        f"* vs foolbox: {ratio(len(x01), t, c, len(x01), t_fb, c_fb, '.2f')} - goal >= 3x",
        f"* median L2 ours / foolbox: **{l2_ratio:.4f}** (goal: within 1 %, "
        f"{'met' if abs(l2_ratio - 1) <= 0.01 else 'NOT met'}); paired per-sample median {paired:.4f}",
    ]
    if n_ta:
        lines += [f"* vs torchattacks: {ratio(len(x01), t, c, n_ta, t_ta, c_ta, '.1f')}",
                  f"* median L2 ours / torchattacks (its {n_ta} samples): "
                  f"{median(l2[:n_ta][ok[:n_ta]]) / median(l2_ta[ok_ta]):.4f}"]
    if args.no_reforward:
        lines.append(f"* {'wall' if on_gpu else 'CPU'} time without / with re-forwarding the running samples "
                     f"(instead of back-propagating through finished ones): {(t_r / t) if on_gpu else (c_r / c):.2f} "
                     f"(median L2 ratio {median(l2_r[ok_r]) / median(l2[ok]):.4f})")
    if args.batched:
        lines.append(f"* per_class vs batched (is_grads_batched) backward: {(t_b / t) if on_gpu else (c_b / c):.2f}x "
                     f"less {'wall' if on_gpu else 'CPU'} time")
    if args.fast_candidates:
        lines += [
            f"Top-{args.fast_candidates} candidates:",
            f"* vs foolbox ({args.candidates} candidates): {ratio(len(x01), t_f, c_f, len(x01), t_fb, c_fb, '.2f')}"
            + (f"; vs torchattacks: {ratio(len(x01), t_f, c_f, n_ta, t_ta, c_ta, '.1f')}" if n_ta else ""),
            f"* median L2 / foolbox: **{median(l2_f[ok_f]) / median(l2_fb[ok_fb]):.4f}**",
        ]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
