#!/usr/bin/env bash
# The CUDA path, checked on a GPU machine in one go (CI has no GPU, so this is how it is checked).
#
#   benchmarks/cuda_check.sh [OUT [SFT_DIR]]      (OUT: runs/bench/cuda_check)
#
# 1. The whole test suite with device=auto, i.e. on the GPU (`-n 6`: pytest-xdist, when the
#    machine has the cores), log in OUT/pytest.log.
# 2. Beside it, when SFT_DIR is given, the reward-accuracy experiment of docs/reward.md at a
#    size a 2-core CPU would take hours over: the SFT model samples 4 responses for every 2-6-word
#    cut of its training quotations (`reward_data.py --all-cuts`), the simulated person ranks
#    them, and a reward model is trained on all of it for 3 epochs, then fresh ones on growing
#    shares of it for 1 epoch. Held out: 16 samples per SFT held-out prompt, as pairs.
#
# Wall-clock limits: TEST_SECONDS (default 300) for the suite, EXPERIMENT_SECONDS (default 360).
# TRAIN_PROMPTS / HELD_OUT_PROMPTS cap the experiment's prompts (default: all) for a dry run.
# Needs python3 with torch (CUDA build) and the project's dependencies importable, and the
# fortunes corpus (ALIGNLOOP_FORTUNES_DIR).
set -uo pipefail
OUT=${1:-runs/bench/cuda_check}
SFT=${2:-}
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "cuda_check.sh: needs a CUDA GPU and python3 with a CUDA build of torch (none here): run it on a GPU machine"
    exit 2
fi
mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
python3 - >"$OUT/env.txt" 2>&1 <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
from alignloop.device import resolve_device, choose_precision
d = resolve_device("auto"); print("alignloop device", d, "precision", choose_precision(d))
EOF
cat "$OUT/env.txt"

experiment() {
    local work=/tmp/cuda_check_reward
    mkdir -p "$work"
    export OMP_NUM_THREADS=4  # the test suite runs beside it
    python3 benchmarks/reward_data.py --model "$SFT" --k 4 --held-out-k 16 --all-cuts --train-prompts "${TRAIN_PROMPTS:-1000000}" \
        --held-out-prompts "${HELD_OUT_PROMPTS:-1000}" --batch-size 4096 --out "$work/data" || return
    tar czf "$OUT/reward_data.tgz" -C "$work" data
    # The most data, 3 epochs, first (the figure to quote); then the 1-epoch curve.
    python3 benchmarks/reward_curve.py --model "$SFT" --data "$work/data" --sizes 1000000 --epochs 3 --out "$work/curve_e3" || return
    tar czf "$OUT/reward_results.tgz" -C "$work" --exclude='rm_*' --exclude='train_*.jsonl' curve_e3
    python3 benchmarks/reward_curve.py --model "$SFT" --data "$work/data" --sizes 11000,22000 --out "$work/curve_e1" || return
    tar czf "$OUT/reward_results.tgz" -C "$work" --exclude='rm_*' --exclude='train_*.jsonl' curve_e1 curve_e3
}
if [ -n "$SFT" ]; then
    timeout "${EXPERIMENT_SECONDS:-360}" bash -c "$(declare -f experiment); OUT='$OUT' SFT='$SFT' experiment" \
        >"$OUT/reward_experiment.log" 2>&1 &
    experiment_pid=$!
fi
workers=$(python3 -c "import os; print(min(6, max(1, len(os.sched_getaffinity(0)) // 2)))")
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n $workers")
OMP_NUM_THREADS=2 timeout "${TEST_SECONDS:-300}" python3 -m pytest -q -m "not browser" -p no:cacheprovider $xdist --timeout 240 \
    >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/pytest.log"
if [ -n "$SFT" ]; then
    wait "$experiment_pid"; echo "reward experiment exit $?"
    grep -v '^\s*$' "$OUT/reward_experiment.log" | tail -30
fi
