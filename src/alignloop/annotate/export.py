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

from pathlib import Path
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..jsonl import write_jsonl
from .agreement import groups
from .db import Annotator, Answer, Campaign, Item

PAIR_POLICIES = ("all", "best_vs_rest", "adjacent")
TIE_POLICIES = ("drop", "half")


def ranking_rows(s: Session, campaign_ids: Sequence[int] | None = None) -> list[dict]:
    """Every answer of the given campaigns (all when None), oldest first."""
    q = (select(Answer, Item, Annotator.name, Campaign.name)
         .join(Item, Answer.item_pk == Item.id).join(Annotator, Answer.annotator_id == Annotator.id)
         .join(Campaign, Answer.campaign_id == Campaign.id).order_by(Answer.id))
    if campaign_ids is not None:
        q = q.where(Answer.campaign_id.in_(list(campaign_ids)))
    return [{"prompt": item.prompt, "responses": item.responses, "ranking": a.ranking, "item_id": item.item_id,
             "annotator": who, "all_bad": a.all_bad, "shown_order": a.shown_order, "strength": a.strength,
             "reason": a.reason, "seconds": round(a.seconds, 3), "campaign": campaign, "answer_id": a.id}
            for a, item, who, campaign in s.execute(q)]


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


def expand_pairs(rows: Sequence[dict], pair_policy: str = "all", tie_policy: str = "drop") -> list[dict]:
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    out = []
    for row in rows:
        extra = {"item_id": row.get("item_id"), "annotator": row.get("annotator")}
        if row.get("strength") is not None:
            extra["margin"] = float(row["strength"])
        for a, b, tied in ranking_pairs(row["ranking"], pair_policy):
            r = row["responses"]
            if not tied:
                out.append({"prompt": row["prompt"], "chosen": r[a], "rejected": r[b], **extra})
            elif tie_policy == "half":
                tie = {**extra, "margin": 0.0, "tie": True}
                out.append({"prompt": row["prompt"], "chosen": r[a], "rejected": r[b], **tie})
                out.append({"prompt": row["prompt"], "chosen": r[b], "rejected": r[a], **tie})
    return out


def write_exports(rows: Sequence[dict], out_dir: Path, prefix: str = "", pair_policy: str = "all",
                  tie_policy: str = "drop", dataset: bool = False) -> dict:
    """Write `<prefix>rankings.jsonl`, `<prefix>preferences.jsonl` and (dataset=True) `<prefix>preferences/`."""
    out_dir = Path(out_dir)
    pairs = expand_pairs(rows, pair_policy, tie_policy)
    paths = {"rankings": out_dir / f"{prefix}rankings.jsonl", "preferences": out_dir / f"{prefix}preferences.jsonl"}
    write_jsonl(paths["rankings"], rows)
    write_jsonl(paths["preferences"], pairs)
    if dataset:
        import datasets  # slow to import; only when asked

        columns = ["prompt", "chosen", "rejected", "item_id", "annotator"] + (["margin"] if pairs and all("margin" in p for p in pairs) else [])
        paths["dataset"] = out_dir / f"{prefix}preferences"
        datasets.Dataset.from_dict({c: [p[c] for p in pairs] for c in columns}).save_to_disk(str(paths["dataset"]))
    return {"rankings": len(rows), "pairs": len(pairs), **{k: str(v) for k, v in paths.items()}}
