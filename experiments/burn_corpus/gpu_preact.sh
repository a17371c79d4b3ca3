#!/bin/bash
# The PreAct-ResNet18 part of BURN's corpus in one call on a GPU machine, within a deadline.
#
#   bash experiments/burn_corpus/gpu_preact.sh CIFAR10_TARBALL OUT_DIR [DEADLINE_S]
#
# On a CPU the PreAct records take hours each (docs/burn-corpus.md), so this script is written to be run
# unattended on a borrowed GPU whose time is short and whose disk is gone afterwards. In order of value:
#
#   1. heldout_preact.yaml: the frozen held-out PreAct record, judged with `burn` and `burn-paper-exact`
#      (the freeze's settings: nothing here changes a rule);
#   2. calibration_preact.yaml: the three calibration records and their observer runs.
#
# Each burn-compare gets the time left before DEADLINE_S (default 540 s from the start) and is stopped
# there; burn-compare resumes from finished cells, so a second call on the same warm machine goes on where
# this one stopped. Whatever is finished is then judged (judge_heldout.py) and analysed (analyse.py) on the
# machine and packed into OUT_DIR/preact_corpus.tar.gz (summaries, records.csv, the runs' burn_df.csv,
# cost.json, the compare reports and logs; no weights), with OUT_DIR/preact_status.txt beside it. The
# script needs only the repository (PYTHONPATH; nothing is installed) and a Python with torch,
# torchvision, pandas, pyyaml, tqdm, matplotlib, scikit-learn and pillow.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash experiments/burn_corpus/gpu_preact.sh CIFAR10_TARBALL OUT_DIR [DEADLINE_S]" >&2
  exit 2
fi
started=$(date +%s)
repo=$(cd "$(dirname "$0")/../.." && pwd)
[ -f "$1" ] || { echo "gpu_preact.sh: no CIFAR-10 tarball at $1; pass the image-folder archive (../shared/data/cifar10-jpeg.tar.gz)" >&2; exit 2; }
tarball=$(realpath "$1")
out=$(mkdir -p "$2" && realpath "$2")
deadline=${3:-540}
work=${BURN_PREACT_WORKDIR:-/tmp/burn_preact_work}
python=${PYTHON:-python3}
corpus="$repo/experiments/burn_corpus"
status="$out/preact_status.txt"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $(( deadline - ($(date +%s) - started) )); }
say() { echo "$(date +%T) [$(( $(date +%s) - started ))s] $*" | tee -a "$status"; }

mkdir -p "$work/data/cifar10" && cd "$work" || exit 2
say "repo $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown), workdir $work, deadline ${deadline}s"
say "$($python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
if [ ! -d data/cifar10/train ]; then
  tar -xzf "$tarball" -C data/cifar10 || { say "could not unpack $tarball"; exit 2; }
fi
[ -f triggers/flower.png ] || $python "$corpus/make_triggers.py" >> "$status" 2>&1

for yaml in heldout_preact.yaml calibration_preact.yaml; do
  budget=$(left)
  if [ "$budget" -le 30 ]; then say "no time left for $yaml"; continue; fi
  say "burn-compare $yaml (at most ${budget}s)"
  timeout --signal=TERM --kill-after=20 "$budget" $python -m burnkit.compare "$corpus/$yaml" --jobs 3 \
      --workdir "$work" > "$work/compare_${yaml%.yaml}.log" 2>&1
  say "burn-compare $yaml exit $? ($(grep -c '] done ' "$work/compare_${yaml%.yaml}.log") cells finished in this call)"
done

# judge and analyse what is finished (each says which runs it skipped)
$python "$corpus/judge_heldout.py" --workdir "$work" --experiments "$corpus/heldout_preact.yaml" \
    --out "$work/results/heldout_preact" >> "$status" 2>&1 || say "judge_heldout: nothing to judge yet"
$python "$corpus/analyse.py" --workdir "$work" --experiments "$corpus/calibration_preact.yaml" \
    --out "$work/results/calibration_preact" --output_name burn-observe-kc2 >> "$status" 2>&1 \
    || say "analyse: nothing to analyse yet"

# pack: results, compare reports and logs, each finished run's small files (no weights, no traces)
cd "$work" && mkdir -p results
find record -path '*/defense/*' \( -name burn_df.csv -o -name burn_df_summary.csv -o -name cost.json \
    -o -name burn_detection.json -o -name '*.log' \) -size -4M > results/run_files.txt 2>/dev/null
find record -maxdepth 2 \( -name provenance.json -o -name attack_df_summary.csv \) >> results/run_files.txt 2>/dev/null
tar -czf "$out/preact_corpus.tar.gz" results compare compare_*.log -T results/run_files.txt 2>>"$status"
say "packed $(du -h "$out/preact_corpus.tar.gz" | cut -f1) into $out/preact_corpus.tar.gz"
