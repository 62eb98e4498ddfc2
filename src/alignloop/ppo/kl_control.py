"""The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019).

The adaptive rule moves beta proportionally to how far the measured KL is from
the target, with the error clipped to +-20 % so one noisy batch cannot swing it,
and scaled by steps/horizon so beta changes smoothly over `horizon` episodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class KLController:
    value: float  # the current beta
    target: float | None = None  # None: fixed coefficient
    horizon: int = 10000  # episodes over which beta may change by about e-fold

    def update(self, measured_kl: float, n_episodes: int) -> None:
        if self.target is None:
            return
        error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
