"""The TRL workers' step clock: perf_counter at the start of training and at the end of every optimiser step.

Runs inside the peer's virtual environment (it imports transformers, never alignloop).
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class Clock(TrainerCallback):
    def __init__(self) -> None:
        self.start = None
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())
