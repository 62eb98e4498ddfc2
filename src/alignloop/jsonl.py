"""Reading and writing JSON Lines, with errors that name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError


Required = dict[str, type | tuple[type, ...]]


def read_jsonl(path: str | Path, required: Required | None = None) -> list[dict[str, Any]]:
    """Read every line of a JSONL file as a dict.

    `required` maps field name -> accepted type(s); a missing field or a value
    of the wrong type raises `InputError` naming the line and the field.
    Blank lines are skipped; anything else that is not a JSON object is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file" if not path.exists() else "not a file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(path, f"not valid JSON ({e.msg} at column {e.colno})", line=line_no) from None
            if not isinstance(row, dict):
                raise InputError(path, f"expected a JSON object, got {type(row).__name__}", line=line_no)
            check_fields(path, line_no, row, required)
            row["_line"] = line_no
            rows.append(row)
    return rows


def check_fields(path: str | Path, line_no: int, row: dict[str, Any], required: Required | None) -> None:
    for field, kind in (required or {}).items():
        if field not in row:
            raise InputError(path, "missing", line=line_no, field=field)
        if not isinstance(row[field], kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise InputError(path, f"expected {names}, got {type(row[field]).__name__}", line=line_no, field=field)


def read_records(path: str | Path, required: Required | None = None) -> list[dict[str, Any]]:
    """JSONL, Parquet, or a `datasets.save_to_disk` directory; rows are numbered from 1 as `_line`.

    Only local files: `datasets` is used for its readers, never for the hub.
    """
    path = Path(path)
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix not in (".parquet",)):
        return read_jsonl(path, required)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    import datasets

    try:
        table = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        raise InputError(path, f"cannot read as a dataset ({type(e).__name__}: {e})") from None
    if isinstance(table, datasets.DatasetDict):
        raise InputError(path, f"holds several splits ({', '.join(table)}); point at one split's directory")
    rows = []
    for i, row in enumerate(table, start=1):
        check_fields(path, i, row, required)
        rows.append({**row, "_line": i})
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows (dropping private `_`-prefixed keys); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)  # atomic: a crash never leaves half a file behind
    return n
