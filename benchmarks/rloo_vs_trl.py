"""RLOO throughput: alignloop vs TRL 1.16's RLOOTrainer, on the demo's models and prompts.

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/rloo_vs_trl.py [--steps 12] [--betas 0.05,0]

What it runs and prints: benchmarks/critic_free_bench.py. The alignloop side is the PPO stage with
`algorithm: rloo`, set to TRL's RLOO choices (benchmarks/_trl_rloo_worker.py lists them): groups
of 4, the leave-one-out baseline, the KL in the reward as beta times the summed k1 log-ratio
(`kl_coef`, none in the loss), advantages not whitened, every sequence weighing the same in the loss.

One difference stays: TRL's surrogate clips the ratio of the whole sequence's probability and
sums its tokens' log-probs (a gradient of A * sum_t grad log pi per sequence); alignloop's clips
per token and, with `sequence_mean`, averages over the sequence's tokens (A * mean_t grad log pi).
With one optimisation pass both ratios are exactly 1, so nothing is clipped and the two differ by
the factor 1 / length per sequence before the gradient-norm clip (1.0 on both sides).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from critic_free_bench import Method, main  # noqa: E402

RLOO = Method(
    name="rloo", title="RLOO", trl_trainer="RLOOTrainer", trl_worker="_trl_rloo_worker.py", trl_default_beta=0.05,
    beta_key="kl_coef",
    alignloop_keys={"kl_estimator": "k1", "loss_aggregation": "sequence_mean"},
)

if __name__ == "__main__":
    sys.exit(main(RLOO))
