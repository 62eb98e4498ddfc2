"""One exception type for everything a user can get wrong.

The CLI catches `AlignloopError` and prints its message on one line, so a bad
input never surfaces as a traceback from deep inside torch.
"""

from __future__ import annotations

import re
from pathlib import Path


def one_line(message: str) -> str:
    """Line breaks (often inside a library's reason quoted in the message) become single spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", message).strip()


class AlignloopError(Exception):
    """An error the user can fix: the message says what and where, on one line (the CLI prints one line)."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(str(message)))


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
