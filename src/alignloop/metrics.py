"""Per-step metrics of a training run: a JSONL file (the record), TensorBoard (the curves), the console.

`metrics.jsonl` is what the report plots read. On resume the rows after the
checkpoint's step are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .jsonl import read_jsonl, write_jsonl


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int = 0,
                 file_name: str = "metrics.jsonl"):
        self.path = Path(out_dir) / file_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
            write_jsonl(self.path, kept)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is optional at run time: the JSONL is the record
                self.writer = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key.replace("_", "/", 1) if "/" not in key else key, value, step)

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """A small table (e.g. sample completions) to `<name>.jsonl` and TensorBoard's text tab."""
        with (self.path.parent / f"{name}.jsonl").open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        if self.writer is not None and rows:
            keys = list(rows[0])
            lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r[k]).replace("|", "\\|").replace("\n", " ") for k in keys) + " |" for r in rows]
            self.writer.add_text(name, "\n".join(lines), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NoMetrics:
    """What a process other than rank 0 logs to: nothing (the job's record is rank 0's)."""

    def log(self, step: int, values: dict[str, Any]) -> None:
        pass

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the fact visible
    return value
