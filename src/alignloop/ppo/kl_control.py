"""The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019).

The adaptive rule moves beta proportionally to how far the measured KL is from
the target, with the error clipped to +-20 % so one noisy batch cannot swing it,
and scaled by steps/horizon so beta changes smoothly over `horizon` episodes.

Beta is held until the measured KL first reaches the target. The policy starts AS
the reference, so the KL is ~0 for the first steps whatever beta is; the plain rule
reads that as "beta too high" and lowers it every step, and the KL then overshoots
the target while beta climbs back (docs/benchmarks.md, "Measurements behind the code").
Holding removes that wind-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class KLController:
    value: float  # the current beta
    target: float | None = None  # None: fixed coefficient
    horizon: int = 10000  # episodes over which beta may change by about e-fold
    reached_target: bool = False  # has the measured KL reached the target yet? (beta is held until then)

    def update(self, measured_kl: float, n_episodes: int) -> None:
        if self.target is None:
            return
        self.reached_target = self.reached_target or measured_kl >= self.target
        if not self.reached_target:
            return
        error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
        self.reached_target = state.get("reached_target", True)  # checkpoints from before the hold adapted at once
