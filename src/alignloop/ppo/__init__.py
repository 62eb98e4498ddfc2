"""Stage 4: PPO with a KL penalty to the SFT model (`alignloop ppo`)."""

from .config import PPOConfig
from .trainer import PPOTrainer, ppo

__all__ = ["PPOConfig", "PPOTrainer", "ppo"]
