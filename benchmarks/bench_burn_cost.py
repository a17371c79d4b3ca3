"""Benchmark (not a test): a full BURN run against SAU at its BackdoorBench budget on the same record,
in one process, one after the other, with the same device, thread count and test-scoring schedule.

SAU runs with its YAML (config/defense/sau/<dataset>.yaml: 100 rounds over 5 % clean data, batch 256,
5 PGD steps, every round scored, as BackdoorBench); BURN with its YAML. Both write their normal outputs
under ``--output_name bench_sau`` / ``bench_burn`` (``--overwrite true``: earlier benchmark outputs are
moved aside). Reported: wall and CPU seconds of each (single-threaded, CPU seconds do not depend on the
machine's other load), final ACC/ASR/RA, BURN's cost parts from its ``cost.json`` and the ratio. The
goal (issue 16): BURN's time <= SAU's.

    cd <workdir> && PYTHONPATH=<repo> python <repo>/benchmarks/bench_burn_cost.py --result_file blended_smallcnn_10k
    ... --sau_rounds 2    # SAU shortened (not its BackdoorBench budget): per-round cost on a big model

Extra flags for either run: ``--burn_args "--test_every 5"``, ``--sau_args "..."`` (then the same for both
is up to the caller; the report prints both command lines).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from burnkit.defense import get_defense, resolve_record_dir
from burnkit.engine import device_description, resolve_device


def run_defense(name: str, argv: list[str]) -> dict:
    """One defense through its CLI class in this process; wall and process-CPU seconds."""
    cls = get_defense(name)
    wall, cpu = time.perf_counter(), time.process_time()
    result = cls.main(argv)
    return {"argv": argv, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "final": result["final"], "cost": result["cost"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result_file", required=True)
    p.add_argument("--dataset_path", default="./data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sau_rounds", type=int, default=0, help="shorten SAU (0 = its YAML's BackdoorBench budget)")
    p.add_argument("--burn_args", default="", help="extra BURN flags")
    p.add_argument("--sau_args", default="", help="extra SAU flags")
    p.add_argument("--order", default="burn,sau", help="which runs first")
    p.add_argument("--out", default=None, help="markdown report (default benchmarks/results/burn_vs_sau_<record>.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = resolve_record_dir(args.result_file).name
    common = ["--result_file", args.result_file, "--dataset_path", args.dataset_path, "--device", args.device,
              "--progress", "false", "--overwrite", "true"]
    runs = {"burn": [*common, "--output_name", "bench_burn", *shlex.split(args.burn_args)],
            "sau": [*common, "--output_name", "bench_sau", *shlex.split(args.sau_args),
                    *(["--n_rounds", str(args.sau_rounds)] if args.sau_rounds else [])]}
    done = {}
    for name in args.order.split(","):
        print(f"== {name}: {' '.join(runs[name])}", flush=True)
        done[name] = run_defense(name, runs[name])
    burn, sau = done["burn"], done["sau"]
    parts = burn["cost"]["burn"]["timings_s"]
    budget = "its BackdoorBench budget" if not args.sau_rounds else f"SHORTENED to {args.sau_rounds} rounds"
    lines = [
        "# BURN vs SAU: compute on one record",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/bench_burn_cost.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Record: `{record}`. Hardware: {device_description(resolve_device(args.device))}, "
        f"{platform.processor() or platform.machine()}; torch {torch.__version__}. Runs one after the other in "
        "one process; on a shared machine CPU seconds of this single-threaded process are the fair measure.",
        "",
        "| defense | budget | wall s | CPU s | ACC | ASR | RA |",
        "|---|---|---|---|---|---|---|",
    ]
    burn_budget = "its YAML defaults" + (f" + `{args.burn_args}`" if args.burn_args else " (T = 20 x 5 epochs)")
    budget += f" + `{args.sau_args}`" if args.sau_args else ""
    for name, what in (("burn", burn_budget), ("sau", budget)):
        r = done[name]
        f = r["final"]
        lines.append(f"| {name} | {what} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {_pct(f.get('test_acc'))} | "
                     f"{_pct(f.get('test_asr'))} | {_pct(f.get('test_ra'))} |")
    lines += [
        "",
        "BURN's parts (s): " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()) + ".",
        "",
        f"* SAU / BURN: **{sau['cpu_s'] / burn['cpu_s']:.2f}x** CPU seconds ({sau['wall_s'] / burn['wall_s']:.2f}x wall)"
        + (" - goal: >= 1 (BURN no slower)" if not args.sau_rounds else
           f" for {args.sau_rounds} SAU rounds; SAU's budget is 100 rounds, so per round SAU costs "
           f"{sau['cpu_s'] / args.sau_rounds:.1f} CPU s"),
        f"* BURN: `defense/burn.py {' '.join(runs['burn'])}`",
        f"* SAU: `defense/sau.py {' '.join(runs['sau'])}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or f"benchmarks/results/burn_vs_sau_{record}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(done, indent=2, default=str) + "\n")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


if __name__ == "__main__":
    main()
