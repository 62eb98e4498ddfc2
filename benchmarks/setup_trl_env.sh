#!/usr/bin/env bash
# The peer's own virtual environment for the benchmarks: TRL 0.23 (the last release with
# PPOTrainer) on transformers < 4.57, with the same CPU torch as alignloop.
# Usage: benchmarks/setup_trl_env.sh [VENV_DIR]   (default .venv-trl)
set -euo pipefail
venv=${1:-.venv-trl}
stamp=$venv/.installed
[ -f "$stamp" ] && exit 0
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first and pinned: nothing after it may pull another (CUDA) build.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "trl==0.23.0" "transformers>=4.56,<4.57" "accelerate>=1.0" "datasets>=3.0" "peft>=0.13" "torch==2.13.0"
touch "$stamp"
