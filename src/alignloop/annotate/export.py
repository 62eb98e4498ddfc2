"""Answers out: raw rankings (one line per person per item) and TRL preference pairs.

Rankings keep everything each person said, in the item's response indices:
    {"prompt", "responses", "ranking", "item_id", "annotator", "all_bad", "shown_order", ...}
Pairs are TRL's columns {"prompt", "chosen", "rejected"} (+ "margin" when a
strength was given, "item_id", "annotator"), as JSONL and as a
`datasets.Dataset.save_to_disk` directory.

Pair policy: "all" (every pair across groups, InstructGPT), "best_vs_rest"
(the best group against each later one), "adjacent" (neighbouring groups).
Tie policy: "drop" (ties give no pair, as InstructGPT trained), or "half":
a tied pair is written both ways, which under Bradley-Terry is exactly a
target of 1/2 (the loss is smallest when the two rewards are equal).
An "all bad" answer is one tied group, so it yields pairs only under "half".
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..files import atomic_open
from .agreement import groups
from .db import Annotator, Answer, Campaign, Item

PAIR_POLICIES = ("all", "best_vs_rest", "adjacent")
TIE_POLICIES = ("drop", "half")
ROWS_PER_FETCH = 500  # answers read from the database at a time: memory stays flat however big the export


def iter_ranking_rows(s: Session, campaign_ids: Sequence[int] | None = None) -> Iterator[dict]:
    """Every answer of the given campaigns (all when None), oldest first, fetched in batches.

    Plain columns, not ORM objects: nothing piles up in the session however big the export.
    """
    q = (select(Item.prompt, Item.responses, Answer.ranking, Item.item_id, Annotator.name, Answer.all_bad,
                Answer.shown_order, Answer.strength, Answer.reason, Answer.seconds, Campaign.name, Answer.id)
         .join(Item, Answer.item_pk == Item.id).join(Annotator, Answer.annotator_id == Annotator.id)
         .join(Campaign, Answer.campaign_id == Campaign.id).order_by(Answer.id)
         .execution_options(yield_per=ROWS_PER_FETCH))
    if campaign_ids is not None:
        q = q.where(Answer.campaign_id.in_(list(campaign_ids)))
    for prompt, responses, ranking, item_id, who, all_bad, order, strength, reason, seconds, campaign, answer_id \
            in s.execute(q):
        yield {"prompt": prompt, "responses": responses, "ranking": ranking, "item_id": item_id,
               "annotator": who, "all_bad": all_bad, "shown_order": order, "strength": strength,
               "reason": reason, "seconds": round(seconds, 3), "campaign": campaign, "answer_id": answer_id}


def ranking_rows(s: Session, campaign_ids: Sequence[int] | None = None) -> list[dict]:
    """`iter_ranking_rows` as a list (for callers that need them all at once)."""
    return list(iter_ranking_rows(s, campaign_ids))


def ranking_pairs(ranking: Sequence, policy: str = "all") -> list[tuple[int, int, bool]]:
    """(better, worse, tied) index pairs of one ranking; tied pairs come from within a group."""
    if policy not in PAIR_POLICIES:
        raise ValueError(f"pair policy must be one of {PAIR_POLICIES}, got {policy!r}")
    gs = groups(ranking)
    if policy == "all":
        across = [(a, b) for i, g in enumerate(gs) for h in gs[i + 1:] for a in g for b in h]
        tied_in = gs
    elif policy == "best_vs_rest":
        across = [(a, b) for h in gs[1:] for a in gs[0] for b in h]
        tied_in = gs[:1]
    else:
        across = [(a, b) for g, h in zip(gs, gs[1:]) for a in g for b in h]
        tied_in = gs
    ties = [(a, b) for g in tied_in for i, a in enumerate(g) for b in g[i + 1:]]
    return [(a, b, False) for a, b in across] + [(a, b, True) for a, b in ties]


def row_pairs(row: dict, pair_policy: str = "all", tie_policy: str = "drop") -> list[dict]:
    """The TRL pairs of one ranking row."""
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    out = []
    extra = {"item_id": row.get("item_id"), "annotator": row.get("annotator")}
    if row.get("strength") is not None:
        extra["margin"] = float(row["strength"])
    r = row["responses"]
    for a, b, tied in ranking_pairs(row["ranking"], pair_policy):
        if not tied:
            out.append({"prompt": row["prompt"], "chosen": r[a], "rejected": r[b], **extra})
        elif tie_policy == "half":
            tie = {**extra, "margin": 0.0, "tie": True}
            out.append({"prompt": row["prompt"], "chosen": r[a], "rejected": r[b], **tie})
            out.append({"prompt": row["prompt"], "chosen": r[b], "rejected": r[a], **tie})
    return out


def iter_pairs(rows: Iterable[dict], pair_policy: str = "all", tie_policy: str = "drop") -> Iterator[dict]:
    for row in rows:
        yield from row_pairs(row, pair_policy, tie_policy)


def expand_pairs(rows: Iterable[dict], pair_policy: str = "all", tie_policy: str = "drop") -> list[dict]:
    return list(iter_pairs(rows, pair_policy, tie_policy))


def jsonl_line(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False) + "\n"


def snapshot_jsonl(rows: Iterable[dict]) -> IO[bytes]:
    """Write `rows` as JSONL into an anonymous temporary file and return it rewound.

    The HTTP export reads its rows inside one short read transaction into this file, closes the
    session, and only then sends the file: a slow reader holds a file, never a lock or a connection.
    """
    f = tempfile.TemporaryFile()
    try:
        for row in rows:
            f.write(jsonl_line(row).encode("utf-8"))
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f


def write_exports(rows: Iterable[dict], out_dir: Path, prefix: str = "", pair_policy: str = "all",
                  tie_policy: str = "drop", dataset: bool = False) -> dict:
    """Write `<prefix>rankings.jsonl`, `<prefix>preferences.jsonl` and (dataset=True) `<prefix>preferences/`.

    One pass over `rows`, written as they come: an export never has to fit in memory. Each file is
    renamed into place once whole (`files.atomic_open`), so a killed export leaves the previous one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"rankings": out_dir / f"{prefix}rankings.jsonl", "preferences": out_dir / f"{prefix}preferences.jsonl"}
    n_rows = n_pairs = 0
    all_margins = True
    with atomic_open(paths["rankings"]) as ranks, atomic_open(paths["preferences"]) as prefs:
        for row in rows:
            ranks.write(jsonl_line(row))
            n_rows += 1
            for pair in row_pairs(row, pair_policy, tie_policy):
                prefs.write(jsonl_line(pair))
                all_margins &= "margin" in pair
                n_pairs += 1
    if dataset:
        paths["dataset"] = out_dir / f"{prefix}preferences"
        save_pairs_dataset(paths["preferences"], paths["dataset"], with_margin=n_pairs > 0 and all_margins)
    return {"ranking_rows": n_rows, "pairs": n_pairs, **{k: str(v) for k, v in paths.items()}}  # "rankings": its path


def save_pairs_dataset(pairs_jsonl: Path, out: Path, with_margin: bool) -> None:
    """preferences.jsonl -> a `datasets.save_to_disk` directory, streamed through Arrow in batches."""
    import datasets  # slow to import; only when asked

    columns = ["prompt", "chosen", "rejected", "item_id", "annotator"] + (["margin"] if with_margin else [])

    def pairs():
        with open(pairs_jsonl, encoding="utf-8") as f:
            for line in f:
                pair = json.loads(line)
                yield {c: pair[c] for c in columns}

    features = datasets.Features({c: datasets.Value("float64" if c == "margin" else "string") for c in columns})
    if pairs_jsonl.stat().st_size == 0:  # nothing answered yet: an empty dataset (from_generator refuses none)
        datasets.Dataset.from_dict({c: [] for c in columns}, features=features).save_to_disk(str(out), num_shards=1)
        return
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: never an earlier export's rows
        datasets.Dataset.from_generator(pairs, features=features, cache_dir=cache).save_to_disk(str(out))
