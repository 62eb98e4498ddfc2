"""Text corpora: the embedded default (Debian's `fortunes` quotations) or the user's own files.

A corpus is a list of documents (strings). Accepted inputs:
- a fortune-format file or directory (records separated by lines holding only `%`),
  which is what `/usr/share/games/fortunes` holds once `apt-get install fortunes` ran;
- a `.txt` file (documents separated by blank lines);
- a `.jsonl` file with a `text` field per line;
- a directory of any of these.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from .errors import InputError
from .jsonl import read_jsonl, read_text
from .splits import shuffled_split

DEFAULT_FORTUNES_DIR = Path(os.environ.get("ALIGNLOOP_FORTUNES_DIR", "/usr/share/games/fortunes"))
# Pictures made of characters teach a language model nothing about language.
SKIPPED_FORTUNE_FILES = {"art", "ascii-art"}


def _normalise(text: str) -> str:
    # One space between words: the small default model spends no capacity on layout.
    return re.sub(r"\s+", " ", text).strip()


def _fortune_records(text: str) -> list[str]:
    return [_normalise(r) for r in re.split(r"^%\s*$", text, flags=re.M) if r.strip()]


def _read_txt(path: Path) -> list[str]:
    # Strict UTF-8: replacing undecodable bytes would train on text the user never wrote.
    text = read_text(path)
    if re.search(r"^%\s*$", text, flags=re.M):
        return _fortune_records(text)
    return [_normalise(p) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_jsonl_texts(path: Path) -> list[str]:
    return [_normalise(row["text"]) for row in read_jsonl(path, required={"text": str}) if row["text"].strip()]


def _is_fortune_data(path: Path) -> bool:
    # strfile writes NAME.dat beside each fortune file NAME.
    return path.suffix == "" and path.with_name(path.name + ".dat").exists()


def load_corpus(source: str | Path | None = None, max_chars: int | None = None) -> list[str]:
    """Documents from `source` (default: the fortunes directory). Raises InputError if none."""
    path = Path(source) if source is not None else DEFAULT_FORTUNES_DIR
    if not path.exists():
        hint = " (install Debian's 'fortunes' package: apt-get install fortunes)" if source is None else ""
        raise InputError(path, "no such file or directory" + hint)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink())
        docs: list[str] = []
        for f in files:
            if f.name in SKIPPED_FORTUNE_FILES:
                continue
            if f.suffix == ".txt" or _is_fortune_data(f):
                docs += _read_txt(f)
            elif f.suffix == ".jsonl":
                docs += _read_jsonl_texts(f)
    elif path.suffix == ".jsonl":
        docs = _read_jsonl_texts(path)
    else:
        docs = _read_txt(path)
    if max_chars is not None:
        docs = [d for d in docs if len(d) <= max_chars]
    if not docs:
        raise InputError(path, "the corpus is empty: no documents found (expected .txt, .jsonl with 'text', or fortune files)")
    return docs


def split_corpus(docs: list[str], held_out_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle then a cut: (train, held_out). Deduplicates first so no text is in both."""
    return shuffled_split(list(dict.fromkeys(docs)), held_out_fraction, random.Random(seed))
