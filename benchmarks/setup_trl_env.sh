#!/usr/bin/env bash
# A peer's own virtual environment for the benchmarks, with the same CPU torch as alignloop.
# Default: TRL 0.23 (the last release with PPOTrainer) on transformers < 4.57.
# Usage: benchmarks/setup_trl_env.sh [VENV_DIR [PACKAGE...]]   (default .venv-trl and TRL 0.23's pins)
set -euo pipefail
venv=${1:-.venv-trl}
shift || true
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=("trl==0.23.0" "transformers>=4.56,<4.57" "accelerate>=1.0" "datasets>=3.0" "peft>=0.13")
stamp=$venv/.installed
[ -f "$stamp" ] && exit 0
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first and pinned, and repeated below: nothing after it may pull another (CUDA) build.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "${packages[@]}" "torch==2.13.0"
touch "$stamp"
