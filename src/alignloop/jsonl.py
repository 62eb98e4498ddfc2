"""Reading text and JSON Lines files, with errors that name file, line and field."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError
from .files import atomic_open


Required = dict[str, type | tuple[type, ...]]

# What a JSON value is called in messages: users wrote JSON, not Python.
JSON_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "object",
                   type(None): "null"}


def decode_utf8(data: bytes, where: str | Path, first_line: int = 1) -> str:
    """`data` as text (a leading BOM dropped); bytes that are not UTF-8 raise InputError naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = first_line + data[: e.start].count(b"\n")
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(where, f"not UTF-8 text (byte {data[e.start]:#04x} at column {column}); "
                                "re-save the file as UTF-8", line=line) from None


def read_bytes(path: str | Path) -> bytes:
    """The whole file; a missing, unreadable or non-regular file raises InputError."""
    path = Path(path)
    check_is_file(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror or e})") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; anything else raises InputError naming the file and line."""
    return decode_utf8(read_bytes(path), path)


def check_is_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(path, "no such file" if not path.exists() else "not a file")


def read_jsonl(path: str | Path, required: Required | None = None) -> list[dict[str, Any]]:
    """Read every line of a JSONL file as a dict.

    `required` maps field name -> accepted type(s); a missing field or a value
    of the wrong type raises `InputError` naming the line and the field.
    Blank lines are skipped; anything else that is not a JSON object is an error.
    """
    path = Path(path)
    check_is_file(path)
    rows = []
    try:
        with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
            for line_no, raw in enumerate(f, start=1):
                text = decode_utf8(raw, path, line_no)
                if not text.strip():
                    continue
                row = parse_json_object(path, line_no, text)
                check_fields(path, line_no, row, required)
                row["_line"] = line_no
                rows.append(row)
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror or e})") from None
    return rows


def parse_json_object(path: str | Path, line_no: int, text: str) -> dict[str, Any]:
    """One line of JSONL -> a dict, or InputError saying why it is not one."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e.msg} at column {e.colno})", line=line_no) from None
    except ValueError as e:  # an integer longer than Python converts (4,300 digits)
        raise InputError(path, f"not usable JSON ({e})", line=line_no) from None
    except RecursionError:
        raise InputError(path, "not usable JSON (nested too deeply)", line=line_no) from None
    if not isinstance(row, dict):
        raise InputError(path, f"expected a JSON object, got {json_type_name(row)}", line=line_no)
    # json accepts "\ud800" escapes that stand for no character; such a string cannot be written back
    # as UTF-8 or tokenised, so it is refused here rather than three stages later.
    if "\\u" in text:
        for key, value in row.items():
            if has_lone_surrogate(value):
                raise InputError(path, "holds an escaped lone surrogate (\\ud800-\\udfff), which is not text",
                                 line=line_no, field=key)
    return row


def has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_type_name(value: Any) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def check_fields(path: str | Path, line_no: int, row: dict[str, Any], required: Required | None) -> None:
    """Each required field is present, of an accepted type (a bool is no number), and a finite number if a float."""
    for field, kind in (required or {}).items():
        if field not in row:
            raise InputError(path, "missing (every row needs it)", line=line_no, field=field)
        value = row[field]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise InputError(path, f"expected {names}, got {json_type_name(value)}", line=line_no, field=field)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(path, f"expected a finite number, got {value}", line=line_no, field=field)


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
    """Write rows (dropping private `_`-prefixed keys); returns how many were written.

    Atomic (`files.atomic_open`): the rows go to `path.tmp`, renamed over `path` once all are written,
    so `path` is never half-written.
    """
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
            n += 1
    return n
