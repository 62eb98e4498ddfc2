"""The TRL 1.16 side of `rloo_vs_trl.py`: RLOOTrainer. Runs inside `.venv-trl116`, never imports alignloop.

Usage: .venv-trl116/bin/python benchmarks/_trl_rloo_worker.py SPEC.json RESULT.json

The spec, the reward function, the timing and the result are `_trl_critic_free.py`'s. RLOO's own
choices are TRL's defaults, written out so the alignloop side can be set to the same ones:
- KL: in the reward, once per sequence: score - beta * sum over tokens of (log pi - log pi_ref)
  (the k1 estimate; Ahmadian et al. 2024); TRL's default beta is 0.05;
- advantages: reward minus the mean of the other K - 1 rewards of its prompt (leave-one-out),
  not normalised (`normalize_advantages=False`);
- loss: a clipped surrogate on the sequence's probability ratio, averaged over sequences
  (alignloop's `loss_aggregation: sequence_mean` weighs sequences the same way).
"""

from __future__ import annotations

import sys

from trl import RLOOConfig, RLOOTrainer

from _trl_critic_free import run_worker

RLOO_ARGS = {"normalize_advantages": False, "mask_truncated_completions": False}

if __name__ == "__main__":
    run_worker(RLOOTrainer, RLOOConfig, RLOO_ARGS, sys.argv[1], sys.argv[2])
