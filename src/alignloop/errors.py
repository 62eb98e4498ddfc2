"""One exception type for everything a user can get wrong.

The CLI catches `AlignloopError` and prints its message on one line, so a bad
input never surfaces as a traceback from deep inside torch.
"""

from __future__ import annotations

from pathlib import Path


class AlignloopError(Exception):
    """An error the user can fix: the message says what and where."""


class InputError(AlignloopError):
    """Bad data in a file: names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class ConfigError(AlignloopError):
    """A config that cannot work: says which key and what to change."""
