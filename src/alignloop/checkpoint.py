"""Saving and restoring a training run's full state, so a killed run resumes where it stopped.

One `state.pt` per checkpoint directory holds every module's weights, every
optimiser and scheduler, the RNG states and whatever counters the stage adds
(data position, KL controller, running statistics). It is written to a temporary
directory first and renamed into place: a crash while saving leaves the previous
checkpoint intact, never half of a new one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

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
    torch.save(state, tmp / STATE_FILE)
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
