"""Stage 3: the reward model (the LM with its last layer replaced by a scalar head)."""

from .model import RewardModel, init_reward_model

__all__ = ["RewardModel", "init_reward_model"]
