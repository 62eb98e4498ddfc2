"""What every `alignloop` command shares: the `--config` / `--set` options and running a config'd API call.

The stage commands in `cli.py`, `reward/cli.py` and `annotate/cli.py` are thin: they build
the stage's config through `StageConfig.load` (the YAML file, then `--set key=value`, then
the command's own flags), call the Python API and print its summary as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file with this stage's config.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key: --set key=value (repeatable).")


def run_command(config_cls: type, api: Callable[[Any], dict], config: Optional[Path], sets: Optional[list[str]],
                **flags: Any) -> dict:
    """Config file, then --set overrides, then explicit flags; run; print the summary (under torchrun or
    accelerate launch, once: rank 0's, which every process returns)."""
    summary = api(config_cls.load(config, sets or [], **flags))
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    if os.environ.get("RANK", "0") == "0":  # one summary per job (under torchrun, rank 0's), not one per process
        console.print_json(json.dumps(summary, default=str))
