"""What the benchmarks need before they run, found or built, or named in one line.

Every benchmark runs with no arguments after `make demo`: it takes the demo's models from
runs/demo, builds the data it needs from them when that is missing, and otherwise stops with
one line saying which command makes the missing input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def need(path: Path, what: str, command: str) -> None:
    """Stop with one line when `path` is missing: what it is and the command that makes it."""
    if not Path(path).exists():
        sys.exit(f"{Path(sys.argv[0]).name}: no {what} at {path}: run `{command}` first")


def ensure_reward_data(model: Path, data: Path) -> Path:
    """benchmarks/reward_data.py's comparisons sampled from `model` at `data`, built when missing."""
    if not (Path(data) / "train.jsonl").is_file():
        need(Path(model) / "config.json", "SFT model", "make demo")
        print(f"building the comparisons at {data} from {model} (benchmarks/reward_data.py)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reward_data.py"), "--model", str(model),
                        "--out", str(data)], check=True)
    return Path(data)
