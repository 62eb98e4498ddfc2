"""Preference data in: pairs and rankings, read, validated and turned into one shape.

Formats (detected per row, so one file may mix them):
  pairs     {"prompt", "chosen", "rejected"}, optional "margin" (TRL's standard form);
            TRL's conversational form with message lists is accepted too, with or
            without an explicit "prompt" (without one, the messages the two
            conversations share form the prompt).
  rankings  {"prompt", "responses": [...], "ranking": [...]}: groups best first, a
            group is an index or a list of tied indices, e.g. [[0, 2], 1].
The annotation app exports these same two formats with extra keys (item_id,
annotator, all_bad, ...): item_id and annotator are kept for the agreement
figures, the rest is ignored.

Every row becomes a `Preference`: K responses with a rank each (0 = best, ties
share a rank); a pair is K=2 with ranks [0, 1]. Malformed rows (bad JSON, a
field of the wrong type) raise `InputError` naming file, line and field; rows
that are well-formed but carry no usable preference (chosen == rejected, an
empty text, a ranking that is not a permutation, all tied) are rejected with
a reason and counted in the summary, never silently dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..jsonl import read_records

DATA_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class Preference:
    prompt: str
    responses: list[str]  # K >= 2 distinct, non-empty texts
    ranks: list[int]  # ranks[i]: 0 for the best group, 1 for the next...; ties share a rank
    margin: float | None = None
    source: str = ""  # "file:line", for messages
    item_id: str | None = None  # the annotation app's item, for annotator agreement
    annotator: str | None = None

    def comparisons(self) -> list[tuple[int, int]]:
        """(better, worse) index pairs: every strictly ordered pair, ties excluded."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(k) if self.ranks[i] < self.ranks[j]]


@dataclass
class PreferenceData:
    items: list[Preference] = field(default_factory=list)
    rows: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    rejected_examples: list[str] = field(default_factory=list)  # "file:line: reason", first few

    def reject(self, where: str, reason: str) -> None:
        self.rejected[reason] += 1
        if len(self.rejected_examples) < 5:
            self.rejected_examples.append(f"{where}: {reason}")

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "used": len(self.items),
            "pairs": sum(len(p.responses) == 2 for p in self.items),
            "rankings": sum(len(p.responses) > 2 for p in self.items),
            "comparisons": sum(len(p.comparisons()) for p in self.items),
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "rejected_examples": list(self.rejected_examples),
        }


# -- field readers: wrong types raise, with file, line and field ----------------

def _messages(path: Path, line: int, name: str, value: Any) -> list[dict]:
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
               for m in value):
        raise InputError(path, 'expected a string or a list of {"role", "content"} messages', line=line, field=name)
    return value


def _text(path: Path, line: int, name: str, value: Any, role: str) -> str:
    """A string, or a message list flattened to the text of its `role` messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = _messages(path, line, name, value)
        picked = [m["content"] for m in msgs if m["role"] == role] or [m["content"] for m in msgs]
        # Our prompt template is single-turn: several messages are joined with a blank line.
        return "\n\n".join(picked)
    raise InputError(path, f"expected str or list of messages, got {type(value).__name__}", line=line, field=name)


def _split_conversations(path: Path, line: int, chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """TRL's implicit-prompt form: the shared leading messages are the prompt."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise InputError(path, "missing (with no 'prompt', chosen and rejected must be message lists)",
                             line=line, field="prompt")
        _messages(path, line, name, value)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    prompt = "\n\n".join(m["content"] for m in chosen[:n])
    return prompt, _text(path, line, "chosen", chosen[n:], "assistant"), _text(path, line, "rejected", rejected[n:], "assistant")


def _number(path: Path, line: int, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(path, f"expected a number, got {type(value).__name__}", line=line, field=name)
    try:
        number = float(value)
    except OverflowError:  # an integer past 1e308
        raise InputError(path, f"expected a number below 1e308, got an integer of {len(str(value))} digits",
                         line=line, field=name) from None
    if not math.isfinite(number):
        raise InputError(path, f"expected a finite number, got {value}", line=line, field=name)
    return number


def _optional_str(row: dict, key: str) -> str | None:
    value = row.get(key)
    return None if value is None else str(value)


def ranks_from_ranking(ranking: list, k: int) -> list[int] | str:
    """Best-first groups -> one rank per response; or the reason the ranking is unusable."""
    ranks = [-1] * k
    for rank, group in enumerate(ranking):
        members = group if isinstance(group, list) else [group]
        if not members:
            return "ranking has an empty group"
        for i in members:
            if not 0 <= i < k:
                return f"ranking is not a permutation of 0..{k - 1} (index {i} out of range)"
            if ranks[i] != -1:
                return f"ranking is not a permutation of 0..{k - 1} (index {i} appears twice)"
            ranks[i] = rank
    missing = [i for i, r in enumerate(ranks) if r == -1]
    if missing:
        return f"ranking is not a permutation of 0..{k - 1} (missing {missing})"
    return ranks


def parse_row(path: Path, row: dict) -> Preference | str:
    """One row -> a Preference, or the reason it carries no usable preference."""
    line = row["_line"]
    where = f"{path}:{line}"
    extra = dict(item_id=_optional_str(row, "item_id"), annotator=_optional_str(row, "annotator"), source=where)
    if "responses" in row or "ranking" in row:
        for key in ("prompt", "responses", "ranking"):
            if key not in row:
                raise InputError(path, "missing", line=line, field=key)
        prompt = _text(path, line, "prompt", row["prompt"], "user")
        responses, ranking = row["responses"], row["ranking"]
        if not isinstance(responses, list):
            raise InputError(path, f"expected a list of responses, got {type(responses).__name__}", line=line, field="responses")
        responses = [_text(path, line, "responses", r, "assistant") for r in responses]
        if not isinstance(ranking, list) or not all(
                (isinstance(g, int) and not isinstance(g, bool))
                or (isinstance(g, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in g))
                for g in ranking):
            raise InputError(path, "expected a list of indices or lists of tied indices, e.g. [[0, 2], 1]",
                             line=line, field="ranking")
        margin = _number(path, line, "margin", row["margin"]) if row.get("margin") is not None else None
        if len(responses) < 2:
            return "fewer than two responses"
        ranks = ranks_from_ranking(ranking, len(responses))
        if isinstance(ranks, str):
            return ranks
        candidate = Preference(prompt, responses, ranks, margin, **extra)
    elif "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise InputError(path, "missing", line=line, field=key)
        if "prompt" in row:
            prompt = _text(path, line, "prompt", row["prompt"], "user")
            chosen = _text(path, line, "chosen", row["chosen"], "assistant")
            rejected = _text(path, line, "rejected", row["rejected"], "assistant")
        else:
            prompt, chosen, rejected = _split_conversations(path, line, row["chosen"], row["rejected"])
        margin = _number(path, line, "margin", row["margin"]) if row.get("margin") is not None else None
        candidate = Preference(prompt, [chosen, rejected], [0, 1], margin, **extra)
    else:
        raise InputError(path, "missing: a row needs chosen/rejected (a pair) or responses/ranking (a ranking)",
                         line=line, field="chosen")
    return validate(candidate)


def validate(p: Preference) -> Preference | str:
    if not p.prompt.strip():
        return "empty prompt"
    if any(not r.strip() for r in p.responses):
        return "empty response"
    if len(p.responses) == 2 and p.responses[0] == p.responses[1]:
        return "chosen == rejected"
    if len(set(p.responses)) < len(p.responses):
        return "the same response appears twice"
    if not p.comparisons():
        return "no preference (all responses tied)"
    return p


def data_files(path: Path) -> list[Path]:
    """A file, or every .jsonl/.parquet file in a directory (sorted, not recursive)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.is_file():
        return [path]
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return [path]  # a datasets.save_to_disk directory: read_records reads it whole
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise InputError(path, "directory holds no .jsonl or .parquet preference files")
    return files


def read_preferences(path: str | Path) -> PreferenceData:
    """Pairs and rankings from a file or directory; unusable rows are counted in `.rejected`."""
    data = PreferenceData()
    for file in data_files(Path(path)):
        for row in read_records(file):
            data.rows += 1
            parsed = parse_row(file, row)
            if isinstance(parsed, str):
                data.reject(f"{file}:{row['_line']}", parsed)
            else:
                data.items.append(parsed)
    return data
