"""The annotation logic. HTTP routes and simulated annotators both call these functions.

Each function takes a SQLAlchemy `Session`, does one transaction and commits
before it returns, so an answer is on disk before anyone is told it was taken.

Assignment: an item goes to `overlap` distinct people. Asking for work leases
the first open item for `lease_seconds`; a live lease counts against the
overlap, so N people can never hold more than N slots; a lease that runs out
returns the slot to the pool. Nobody gets an item they answered or skipped.
Each person sees the responses in their own shuffled order, and the order
shown is stored with the answer (position-bias audit).
"""

from __future__ import annotations

import hashlib
import random
import secrets
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import AlignloopError, InputError
from ..jsonl import check_fields, read_jsonl
from .agreement import agreement_summary, first_position_bias, pairwise_agreement
from .db import Annotator, Answer, Campaign, Item, Lease, Skip, get_sessionmaker

MODES = ("rank", "pairwise")
MAX_REASON = 2000
TOO_FAST_CHARS_PER_S = 80.0  # ~4x a fast reading speed: an answer quicker than this was not read


class Refused(AlignloopError):
    """A request the service will not carry out; `status` is the HTTP code the routes send."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


# ---- people -------------------------------------------------------------------------------------

def hash_token(token: str) -> str:
    # Tokens are 192 random bits, so a fast hash is enough; only the hash is stored.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_annotator(s: Session, name: str, admin: bool = False) -> str:
    """Make a person and return their sign-in token (shown once, never stored)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise Refused(422, "annotator name must be 1-100 characters")
    if s.scalar(select(Annotator).where(Annotator.name == name)):
        raise Refused(409, f"annotator '{name}' exists already")
    token = secrets.token_urlsafe(24)
    s.add(Annotator(name=name, token_hash=hash_token(token), is_admin=admin, created=time.time()))
    s.commit()
    return token


def authenticate(s: Session, token: str | None) -> Annotator | None:
    if not token:
        return None
    return s.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))


# ---- campaigns ----------------------------------------------------------------------------------

def read_campaign_file(path: str | Path) -> list[dict]:
    """What `alignloop sample` writes: {"item_id", "prompt", "responses": [...], "meta": {...}} per line."""
    return read_jsonl(path, required={"item_id": str, "prompt": str, "responses": list})


def create_campaign(s: Session, name: str, items: Sequence[dict], mode: str = "rank", overlap: int = 1,
                    lease_seconds: int = 900, source: str = "<upload>") -> Campaign:
    """Import items (checked line by line: errors name `source`, the line and the field)."""
    if mode not in MODES:
        raise Refused(422, f"mode must be one of {MODES}, got {mode!r}")
    if not 1 <= overlap <= 100 or not 10 <= lease_seconds <= 86400:
        raise Refused(422, "overlap must be 1-100 and lease_seconds 10-86400")
    if not name.strip() or s.scalar(select(Campaign).where(Campaign.name == name)):
        raise Refused(409, f"campaign name {name!r} is empty or taken")
    if not items:
        raise InputError(source, "no items")
    campaign = Campaign(name=name, mode=mode, overlap=overlap, lease_seconds=lease_seconds, created=time.time())
    s.add(campaign)
    s.flush()
    seen: set[str] = set()
    for n, row in enumerate(items, start=1):
        line = row.get("_line", n) if isinstance(row, dict) else n
        if not isinstance(row, dict):
            raise InputError(source, "expected a JSON object", line=line)
        check_fields(source, line, row, {"item_id": str, "prompt": str, "responses": list})
        responses = row["responses"][:2] if mode == "pairwise" else row["responses"]  # pairwise: the first two
        if len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise InputError(source, "expected a list of at least two strings", line=line, field="responses")
        if row["item_id"] in seen:
            raise InputError(source, f"duplicate item_id {row['item_id']!r}", line=line, field="item_id")
        seen.add(row["item_id"])
        gold = row.get("gold")
        if gold is not None:
            try:
                gold = normalize_ranking(gold, len(responses))
            except Refused as e:
                raise InputError(source, str(e), line=line, field="gold") from None
        s.add(Item(campaign_id=campaign.id, item_id=row["item_id"], prompt=row["prompt"], responses=responses,
                   meta=row.get("meta") or {}, is_gold=gold is not None, gold=gold))
    s.commit()
    return campaign


def set_overlap(s: Session, campaign_id: int, overlap: int) -> None:
    """Change N mid-campaign: lowering it never removes answers, raising it reopens finished items."""
    if not 1 <= overlap <= 100:
        raise Refused(422, "overlap must be 1-100")
    _campaign(s, campaign_id, lock=True).overlap = overlap
    s.commit()


def list_campaigns(s: Session) -> list[dict]:
    return [{"id": c.id, "name": c.name, "mode": c.mode, "overlap": c.overlap,
             "items": s.scalar(select(func.count()).where(Item.campaign_id == c.id))}
            for c in s.scalars(select(Campaign).order_by(Campaign.id))]


def _campaign(s: Session, campaign_id: int, lock: bool = False) -> Campaign:
    # The row lock serialises assignment per campaign on PostgreSQL & co; SQLite already holds its write lock.
    q = select(Campaign).where(Campaign.id == campaign_id)
    campaign = s.scalar(q.with_for_update() if lock else q)
    if campaign is None:
        raise Refused(404, f"no campaign {campaign_id}")
    return campaign


# ---- assignment ---------------------------------------------------------------------------------

def shown_order(annotator_id: int, item: Item) -> list[int]:
    """The order one person sees an item's responses in: shown_order[p] = response index at position p."""
    order = list(range(len(item.responses)))
    random.Random(f"{annotator_id}:{item.id}").shuffle(order)
    return order


def _has_room(s: Session, campaign: Campaign, item: Item, annotator_id: int, now: float) -> bool:
    if item.is_gold:
        return True
    answers = s.scalar(select(func.count()).where(Answer.item_pk == item.id))
    leases = s.scalar(select(func.count()).where(Lease.item_pk == item.id, Lease.expires > now,
                                                 Lease.annotator_id != annotator_id))
    return answers + leases < campaign.overlap


def _open_items(campaign: Campaign, annotator_id: int, now: float):
    """Items this person may still get: not answered or skipped by them, with a free slot (or gold)."""
    mine = select(Answer.item_pk).where(Answer.campaign_id == campaign.id, Answer.annotator_id == annotator_id)
    skipped = select(Skip.item_pk).where(Skip.campaign_id == campaign.id, Skip.annotator_id == annotator_id)
    answers = select(func.count()).where(Answer.item_pk == Item.id).scalar_subquery()
    leases = select(func.count()).where(Lease.item_pk == Item.id, Lease.expires > now,
                                        Lease.annotator_id != annotator_id).scalar_subquery()
    return select(Item).where(Item.campaign_id == campaign.id, Item.id.not_in(mine), Item.id.not_in(skipped),
                              Item.is_gold | (answers + leases < campaign.overlap))


def _view(s: Session, campaign: Campaign, item: Item, annotator: Annotator) -> dict:
    order = shown_order(annotator.id, item)
    return {"campaign": campaign.id, "mode": campaign.mode, "item": item.id, "item_id": item.item_id,
            "prompt": item.prompt, "responses": [item.responses[i] for i in order],
            "progress": progress(s, annotator, campaign.id)}


def next_item(s: Session, annotator: Annotator, campaign_id: int) -> dict | None:
    """The item this person should answer now (leased to them), or None when nothing is left for them."""
    now = time.time()
    campaign = _campaign(s, campaign_id, lock=True)
    held = s.scalar(select(Lease).where(Lease.campaign_id == campaign_id, Lease.annotator_id == annotator.id)
                    .order_by(Lease.id))
    if held is not None:
        item = s.get(Item, held.item_pk)
        if held.expires > now or _has_room(s, campaign, item, annotator.id, now):
            held.expires = now + campaign.lease_seconds
            s.commit()
            return _view(s, campaign, item, annotator)
        s.delete(held)  # expired and the slot went to someone else
    item = s.scalar(_open_items(campaign, annotator.id, now).order_by(Item.id).limit(1))
    if item is None:
        s.commit()
        return None
    s.add(Lease(campaign_id=campaign_id, item_pk=item.id, annotator_id=annotator.id, issued=now,
                expires=now + campaign.lease_seconds))
    s.commit()
    return _view(s, campaign, item, annotator)


def progress(s: Session, annotator: Annotator, campaign_id: int) -> dict:
    done = s.scalar(select(func.count()).where(Answer.campaign_id == campaign_id, Answer.annotator_id == annotator.id))
    campaign = s.get(Campaign, campaign_id)
    left = s.scalar(select(func.count()).select_from(_open_items(campaign, annotator.id, time.time()).subquery()))
    return {"done": done, "left": left}


# ---- answers ------------------------------------------------------------------------------------

def normalize_ranking(ranking: Any, k: int) -> list:
    """Check that `ranking` places each of 0..k-1 exactly once; singletons as ints, tied groups sorted."""
    if not isinstance(ranking, list) or not ranking:
        raise Refused(422, "ranking must be a non-empty list of groups")
    out, seen = [], []
    for group in ranking:
        members = [group] if not isinstance(group, list) else group
        if not members or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in members):
            raise Refused(422, f"ranking groups must hold indices 0..{k - 1}, got {group!r}")
        seen += members
        out.append(members[0] if len(members) == 1 else sorted(members))
    if sorted(seen) != list(range(k)):
        raise Refused(422, f"ranking must place each of the {k} responses exactly once, got {ranking!r}")
    return out


def submit_answer(s: Session, annotator: Annotator, campaign_id: int, item_pk: int, ranking: Any,
                  all_bad: bool = False, strength: int | None = None, reason: str | None = None) -> dict:
    """Record one answer; `ranking` is in *shown positions* (what the person saw), stored in response indices."""
    now = time.time()
    campaign = _campaign(s, campaign_id, lock=True)
    item = s.get(Item, item_pk)
    if item is None or item.campaign_id != campaign_id:
        raise Refused(404, f"no item {item_pk} in campaign {campaign_id}")
    if s.scalar(select(Answer.id).where(Answer.item_pk == item_pk, Answer.annotator_id == annotator.id)):
        raise Refused(409, "you answered this item already (undo it first to change it)")
    lease = s.scalar(select(Lease).where(Lease.item_pk == item_pk, Lease.annotator_id == annotator.id))
    if lease is None:
        raise Refused(409, "this item is not assigned to you; ask for the next item")
    if lease.expires <= now and not _has_room(s, campaign, item, annotator.id, now):
        s.delete(lease)
        s.commit()
        raise Refused(409, "your lease on this item ran out and it went to someone else")
    k = len(item.responses)
    if all_bad:  # one tied group of all, whatever order was sent
        if ranking not in (None, []):
            normalize_ranking(ranking, k)
        ranking = [list(range(k))]
    positions = normalize_ranking(ranking, k)
    if strength is not None and (isinstance(strength, bool) or strength not in (1, 2, 3)):
        raise Refused(422, "strength must be 1, 2 or 3 (or absent)")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise Refused(422, f"reason must be text of at most {MAX_REASON} characters")
    order = shown_order(annotator.id, item)
    to_index = lambda p: order[p]  # noqa: E731
    stored = [to_index(g) if isinstance(g, int) else sorted(map(to_index, g)) for g in positions]
    answer = Answer(campaign_id=campaign_id, item_pk=item_pk, annotator_id=annotator.id, ranking=stored,
                    shown_order=order, all_bad=bool(all_bad), strength=strength, reason=(reason or None),
                    seconds=now - lease.issued, created=now)
    s.add(answer)
    s.delete(lease)
    try:
        s.commit()
    except IntegrityError:  # a concurrent duplicate: the unique constraint keeps exactly one
        s.rollback()
        raise Refused(409, "you answered this item already") from None
    done = s.scalar(select(func.count()).where(Answer.campaign_id == campaign_id, Answer.annotator_id == annotator.id))
    return {"answer": answer.id, "ranking": stored, "done": done}


def skip_item(s: Session, annotator: Annotator, campaign_id: int, item_pk: int) -> None:
    """Never show this item to this person again; its slot returns to the pool."""
    _campaign(s, campaign_id, lock=True)
    lease = s.scalar(select(Lease).where(Lease.item_pk == item_pk, Lease.annotator_id == annotator.id,
                                         Lease.campaign_id == campaign_id))
    if lease is None:
        raise Refused(409, "this item is not assigned to you")
    s.delete(lease)
    s.add(Skip(campaign_id=campaign_id, item_pk=item_pk, annotator_id=annotator.id, created=time.time()))
    s.commit()


def undo_last(s: Session, annotator: Annotator, campaign_id: int) -> dict:
    """Delete this person's latest answer in the campaign and hand the item straight back to them."""
    campaign = _campaign(s, campaign_id, lock=True)
    answer = s.scalar(select(Answer).where(Answer.campaign_id == campaign_id, Answer.annotator_id == annotator.id)
                      .order_by(Answer.id.desc()))
    if answer is None:
        raise Refused(409, "nothing to undo")
    now = time.time()
    s.execute(delete(Lease).where(Lease.campaign_id == campaign_id, Lease.annotator_id == annotator.id))
    s.delete(answer)  # frees this person's slot, taken again at once by the lease below
    s.add(Lease(campaign_id=campaign_id, item_pk=answer.item_pk, annotator_id=annotator.id, issued=now,
                expires=now + campaign.lease_seconds))
    s.commit()
    return {"undone": answer.id, "item": answer.item_pk}


def answer_dict(answer: Answer, name: str) -> dict:
    return {"id": answer.id, "campaign": answer.campaign_id, "item": answer.item_pk, "annotator": name,
            "ranking": answer.ranking, "shown_order": answer.shown_order, "all_bad": answer.all_bad,
            "strength": answer.strength, "reason": answer.reason, "seconds": round(answer.seconds, 3),
            "created": answer.created}


def answers_of(s: Session, annotator: Annotator, campaign_id: int) -> list[dict]:
    rows = s.scalars(select(Answer).where(Answer.campaign_id == campaign_id, Answer.annotator_id == annotator.id)
                     .order_by(Answer.id))
    return [answer_dict(a, annotator.name) for a in rows]


# ---- quality ------------------------------------------------------------------------------------

def campaign_stats(s: Session, campaign_id: int) -> dict:
    """Items done, time per item, agreement between people and with gold, fast answers, position bias."""
    campaign = _campaign(s, campaign_id)
    items = {i.id: i for i in s.scalars(select(Item).where(Item.campaign_id == campaign_id))}
    names = dict(s.execute(select(Annotator.id, Annotator.name)).all())
    answers = list(s.scalars(select(Answer).where(Answer.campaign_id == campaign_id)))
    skips = dict(s.execute(select(Skip.annotator_id, func.count()).where(Skip.campaign_id == campaign_id)
                           .group_by(Skip.annotator_id)).all())
    counts: dict[int, int] = {}
    for a in answers:
        counts[a.item_pk] = counts.get(a.item_pk, 0) + 1
    agreement = agreement_summary([(a.item_pk, a.annotator_id, a.ranking) for a in answers])
    people = {}
    for who in sorted({a.annotator_id for a in answers} | set(skips)):
        mine = [a for a in answers if a.annotator_id == who]
        gold = [pairwise_agreement(a.ranking, items[a.item_pk].gold) for a in mine if items[a.item_pk].is_gold]
        chars = lambda a: len(items[a.item_pk].prompt) + sum(map(len, items[a.item_pk].responses))  # noqa: E731
        people[names[who]] = {
            "answers": len(mine), "skips": skips.get(who, 0),
            "median_seconds": statistics.median(a.seconds for a in mine) if mine else None,
            "too_fast": sum(a.seconds * TOO_FAST_CHARS_PER_S < chars(a) for a in mine),
            "agreement_with_others": agreement["per_annotator"].get(who),
            "agreement_with_consensus": agreement["per_annotator_consensus"].get(who),
            "gold_agreement": sum(g for g, _ in gold) / sum(t for _, t in gold) if gold and sum(t for _, t in gold) else None,
        }
    return {
        "campaign": campaign.id, "name": campaign.name, "mode": campaign.mode, "overlap": campaign.overlap,
        "items": len(items), "answers": len(answers),
        "items_complete": sum(counts.get(i, 0) >= campaign.overlap for i in items),
        "all_bad": sum(a.all_bad for a in answers),
        "agreement": {k: v for k, v in agreement.items() if not k.startswith("per_annotator")},
        "position_bias": first_position_bias([(a.ranking, a.shown_order) for a in answers]),
        "annotators": people,
    }


def campaign_progress(db_url: str, campaign_id: int) -> tuple[int, int]:
    """(answers counted up to the overlap per item, items x overlap): the campaign is finished when equal."""
    with get_sessionmaker(db_url)() as s:
        campaign = _campaign(s, campaign_id)
        per_item = s.execute(select(Item.id, func.count(Answer.id)).outerjoin(Answer, Answer.item_pk == Item.id)
                             .where(Item.campaign_id == campaign_id).group_by(Item.id)).all()
        return sum(min(n, campaign.overlap) for _, n in per_item), len(per_item) * campaign.overlap
