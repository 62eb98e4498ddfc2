"""GRPO throughput: alignloop vs TRL 1.16's GRPOTrainer, on the demo's models and prompts.

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/grpo_vs_trl.py [--steps 12] [--betas 0.05,0]

What it runs and prints: benchmarks/critic_free_bench.py. The alignloop side is the PPO stage with
`algorithm: grpo`, set to TRL's GRPO choices (benchmarks/_trl_grpo_worker.py lists them): groups
of 4, advantages normalised by the group's mean and std, the KL as beta times a k3 term in the
loss (`kl_loss_coef`, none in the reward), the clipped surrogate averaged over the batch's tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from critic_free_bench import Method, main  # noqa: E402

GRPO = Method(
    name="grpo", title="GRPO", trl_trainer="GRPOTrainer", trl_worker="_trl_grpo_worker.py", trl_default_beta=0.0,
    beta_key="kl_loss_coef",
    alignloop_keys={"group_std_normalize": True, "loss_aggregation": "token_mean"},
)

if __name__ == "__main__":
    sys.exit(main(GRPO))
