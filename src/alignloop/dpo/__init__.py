"""The `dpo` stage: DPO and IPO on preference pairs and rankings, from the SFT model (`alignloop dpo`)."""

from .losses import dpo_loss, ipo_loss
from .train import DPOConfig, train_dpo

__all__ = ["DPOConfig", "dpo_loss", "ipo_loss", "train_dpo"]
