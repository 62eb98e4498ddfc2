"""The TRL 1.16 side of `grpo_vs_trl.py`: GRPOTrainer. Runs inside `.venv-trl116`, never imports alignloop.

Usage: .venv-trl116/bin/python benchmarks/_trl_grpo_worker.py SPEC.json RESULT.json

The spec, the reward function, the timing and the result are `_trl_critic_free.py`'s. GRPO's own
choices are TRL's defaults, written out so the alignloop side can be set to the same ones:
- advantages: (r - group mean) / (group std + 1e-4) (`scale_rewards="group"`, DeepSeekMath's GRPO);
- loss: the clipped surrogate per token, summed over the batch's tokens and divided by their
  count (`loss_type="dapo"`, DAPO's token-level mean; alignloop's `loss_aggregation: token_mean`);
- KL: beta times the k3 estimate per token in the loss (no reference model loaded at beta 0).
"""

from __future__ import annotations

import sys

from trl import GRPOConfig, GRPOTrainer

from _trl_critic_free import run_worker

GRPO_ARGS = {"loss_type": "dapo", "scale_rewards": "group", "mask_truncated_completions": False}

if __name__ == "__main__":
    run_worker(GRPOTrainer, GRPOConfig, GRPO_ARGS, sys.argv[1], sys.argv[2])
