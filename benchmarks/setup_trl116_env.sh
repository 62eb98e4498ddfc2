#!/usr/bin/env bash
# The peer's own virtual environment for the critic-free (GRPO, RLOO) and DPO benchmarks:
# TRL 1.16 (GRPOTrainer, RLOOTrainer, DPOTrainer) with the same CPU torch as alignloop.
# Usage: benchmarks/setup_trl116_env.sh [VENV_DIR]   (default .venv-trl116)
set -euo pipefail
venv=${1:-.venv-trl116}
stamp=$venv/.installed
[ -f "$stamp" ] && exit 0
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first and pinned, and repeated below: nothing after it may pull another (CUDA) build.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "trl==1.16.0" "transformers>=4.56.2" "accelerate>=1.10.1" "datasets>=4.7.0" "peft>=0.13" "torch==2.13.0"
touch "$stamp"
