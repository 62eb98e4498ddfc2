"""Saving and restoring a training run's full state, so a killed run resumes where it stopped.

One `state.pt` per checkpoint directory holds every module's weights by role, every
optimiser and scheduler, the RNG states and whatever counters the stage adds
(data position, KL controller, running statistics). It is written to a temporary
directory first, flushed to disk and renamed into place: a crash while saving leaves
the previous checkpoint intact, never half of a new one.

`Checkpointer` is what the training stages use (pretrain and SFT through `train_lm`,
reward training, PPO): it stamps each checkpoint with the stage's config fingerprint
and resumes only from one of the same config and inputs.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

STATE_FILE = "state.pt"


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    # RNG states must be CPU byte tensors, but load_checkpoint(map_location="cuda") moved them.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].cpu())


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """`state` maps names to state_dicts (modules, optimisers, schedulers) or plain values."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with (tmp / STATE_FILE).open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The saved state, or None when there is no complete checkpoint at `directory`."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        old = Path(directory).with_name(Path(directory).name + ".old") / STATE_FILE
        if not old.is_file():  # a crash between the two renames leaves the previous one here
            return None
        path = old
    return torch.load(path, map_location=device, weights_only=False)


class Checkpointer:
    """Every `every` steps, the run's state to `directory`; on start, the state of an earlier run of
    the same config (`fingerprint`), if one was interrupted."""

    def __init__(self, directory: str | Path, fingerprint: str, every: int,
                 log: Callable[[str], None] = lambda message: None):
        self.directory, self.fingerprint, self.every, self.log = Path(directory), fingerprint, every, log

    def due(self, step: int) -> bool:
        """After optimiser step `step` (1-based), is a checkpoint due?"""
        return self.every > 0 and step % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.directory, {**state, "fingerprint": self.fingerprint})

    def load(self, device: torch.device | str = "cpu") -> dict[str, Any] | None:
        state = load_checkpoint(self.directory, device)
        if state is None:
            return None
        if state.get("fingerprint") != self.fingerprint:
            self.log(f"{self.directory} was written by another config or other inputs: starting over")
            return None
        self.log(f"resuming from {self.directory} (step {state.get('step')})")
        return state

    def remove(self) -> None:
        """The run finished: its outputs are what a rerun reuses, not this mid-run state."""
        for path in (self.directory, self.directory.with_name(self.directory.name + ".old")):
            shutil.rmtree(path, ignore_errors=True)
