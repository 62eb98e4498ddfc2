"""The policy-gradient methods the `algorithm` key selects, as advantage estimators on one experience maker.

Every method shares the rollout, the RM scores, the per-token rewards (score at the last token,
-beta * KL at every token), the clipped surrogate, the guards and the checkpoints; they differ in
how per-token rewards become advantages, and in whether a critic is learnt at all:

  ppo           GAE(gamma, lambda) against a learnt critic (Schulman et al. 2017; Ouyang et al. 2022)
  grpo          group-normalised sequence rewards, no critic (Shao et al. 2024)
  rloo          leave-one-out baseline over the group, no critic (Ahmadian et al. 2024)
  reinforce_pp  per-token returns whitened over the whole batch, no critic (Hu 2025, REINFORCE++)

Each estimator maps (rewards, values, mask, config) -> (advantages, returns), all (B, R). The
critic-free ones return zero returns: there is no value function to fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .losses import (gae, group_normalized_advantages, leave_one_out_advantages, returns_to_go, sequence_rewards,
                     whiten)

if TYPE_CHECKING:
    from .config import PPOConfig

AdvantageEstimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "PPOConfig"],
                              tuple[torch.Tensor, torch.Tensor]]


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's estimator: GAE against the critic, whitened over the batch's tokens (whiten_advantages)."""
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns


def grpo_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One advantage per response, its group-normalised total reward, on every one of its tokens."""
    per_response = group_normalized_advantages(sequence_rewards(rewards, mask), config.samples_per_prompt,
                                               config.group_std_normalize)
    return per_response[:, None] * mask, torch.zeros_like(rewards)


def rloo_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One advantage per response, its total reward minus the mean of its group's others."""
    per_response = leave_one_out_advantages(sequence_rewards(rewards, mask), config.samples_per_prompt)
    return per_response[:, None] * mask, torch.zeros_like(rewards)


def reinforce_pp_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                            config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token returns-to-go, whitened over every token of the batch: the global baseline replaces a critic."""
    return whiten(returns_to_go(rewards, mask, config.gamma), mask), torch.zeros_like(rewards)


@dataclass(frozen=True)
class Algorithm:
    estimate_advantages: AdvantageEstimator
    learns_critic: bool  # PPO's value function; the others baseline against other samples instead
    min_group: int  # responses per prompt the baseline needs (samples_per_prompt >= this)


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(gae_advantages, learns_critic=True, min_group=1),
    "grpo": Algorithm(grpo_advantages, learns_critic=False, min_group=2),
    "rloo": Algorithm(rloo_advantages, learns_critic=False, min_group=2),
    "reinforce_pp": Algorithm(reinforce_pp_advantages, learns_critic=False, min_group=1),
}
