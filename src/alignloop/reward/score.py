"""Scoring a file of responses: what `alignloop reward score` runs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..errors import InputError
from ..jsonl import read_records, write_jsonl
from ..stage import StageContext
from .model import RewardModel


def read_responses(path: Path) -> list[dict]:
    """Rows with a str `prompt` and a str `response` (or `completion`, the generations format)."""
    rows = read_records(path, required={"prompt": str})
    for row in rows:
        key = "response" if "response" in row else "completion"
        if not isinstance(row.get(key), str):
            raise InputError(path, "missing (expected 'response' or 'completion')" if key not in row
                             else f"expected str, got {type(row[key]).__name__}", line=row["_line"], field=key)
        row["_response"] = row[key]
    if not rows:
        raise InputError(path, "no rows")
    return rows


def score_file(reward_model: Path, data: Path, out: Path, normalize: bool = True, batch_size: int = 64,
               device: str = "auto", precision: str = "auto") -> dict:
    start = time.time()
    rm = RewardModel.from_pretrained(reward_model, *StageContext().resolve(device, precision))
    rows = read_responses(Path(data))
    rewards = rm.score([r["prompt"] for r in rows], [r["_response"] for r in rows], batch_size, normalize)
    write_jsonl(out, ({**r, "reward": s} for r, s in zip(rows, rewards)))
    return {"out": str(out), "scored": len(rows), "reward_mean": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards), "normalized": normalize, "seconds": time.time() - start}
