#!/usr/bin/env bash
# The peer's own virtual environment for the critic-free (GRPO, RLOO) and DPO benchmarks:
# TRL 1.16 (GRPOTrainer, RLOOTrainer, DPOTrainer), made by setup_trl_env.sh with these pins.
# Usage: benchmarks/setup_trl116_env.sh [VENV_DIR]   (default .venv-trl116)
set -euo pipefail
exec "$(dirname "$0")/setup_trl_env.sh" "${1:-.venv-trl116}" \
    "trl==1.16.0" "transformers>=4.56.2" "accelerate>=1.10.1" "datasets>=4.7.0" "peft>=0.13"
