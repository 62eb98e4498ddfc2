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
import json
import math
import random
import secrets
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from ..errors import AlignloopError, InputError
from ..jsonl import check_fields, read_jsonl
from .agreement import agreement_summary, first_position_bias, pairwise_agreement
from .db import MAX_ID, Annotator, Answer, Campaign, Conflict, Item, Lease, Skip, get_sessionmaker, write_transaction

MODES = ("rank", "pairwise")
TOO_FAST_CHARS_PER_S = 80.0  # ~4x a fast reading speed: an answer quicker than this was not read

# Caps on everything a person or a campaign file can send; the HTTP schema uses the same numbers.
MAX_NAME = 100  # an annotator's name
MAX_CAMPAIGN_NAME = 200
MAX_ITEM_ID = 200
MAX_TEXT = 100_000  # a prompt or one response, in characters
MAX_RESPONSES = 16  # K, the responses of one item
MAX_REASON = 2000
MAX_META_CHARS = 10_000  # an item's meta (or gold), as JSON
MAX_JSON_DEPTH = 8
MAX_ITEMS = 100_000  # items of one campaign


class Refused(AlignloopError):
    """A request the service will not carry out; `status` is the HTTP code the routes send."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


# ---- checks shared by the routes, the campaign files and the CLI ----------------------------------

def text_problem(value: Any, max_chars: int, nul_ok: bool = False) -> str | None:
    """Why `value` cannot be stored (None if it can): not a string, too long, a lone surrogate (no
    UTF-8 encoding exists) or, unless `nul_ok`, NUL. PostgreSQL's text columns refuse NUL; its JSON
    columns (responses, meta) keep it escaped, and model output may hold it. Never quotes the value."""
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    if len(value) > max_chars:
        return f"at most {max_chars} characters (got {len(value)})"
    if not nul_ok and "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    return None


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why `value` cannot be stored in a JSON column on every database (None if it can)."""
    if depth > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    if value is None or isinstance(value, (bool, int)) and abs(value) <= MAX_ID:
        return None
    if isinstance(value, int):
        return "holds an integer beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "holds NaN or infinity"
    if isinstance(value, str):
        return text_problem(value, MAX_META_CHARS, nul_ok=True)
    if isinstance(value, list):
        return next((p for p in (json_problem(v, depth + 1) for v in value) if p), None)
    if isinstance(value, dict):
        return next((p for p in (text_problem(k, MAX_NAME, nul_ok=True) or json_problem(v, depth + 1)
                                 for k, v in value.items())
                     if p), None)
    return f"holds a {type(value).__name__}, which is not JSON"


def check_text(value: Any, what: str, max_chars: int, empty_ok: bool = False) -> str:
    problem = text_problem(value, max_chars) or (None if empty_ok or value.strip() else "must not be empty")
    if problem:
        raise Refused(422, f"{what}: {problem}")
    return value


def valid_id(value: Any) -> bool:
    """A database id: a positive int that fits in 64 bits (a bool is not an id)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


# ---- people -------------------------------------------------------------------------------------

def hash_token(token: str) -> str:
    # Tokens are 192 random bits, so a fast hash is enough; only the hash is stored.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def revoked_hash() -> str:
    # Not a hex digest (it has a "-"), so no token can ever hash to it; random, so it stays unique.
    return "revoked-" + secrets.token_hex(28)


def create_annotator(s: Session, name: str, admin: bool = False) -> str:
    """Make a person and return their sign-in token (shown once, never stored)."""
    name = check_text(name, "annotator name", MAX_NAME).strip()
    token = secrets.token_urlsafe(24)
    with write_transaction(s):
        if s.scalar(select(Annotator.id).where(Annotator.name == name)):
            raise Refused(409, "an annotator of that name exists already")
        s.add(Annotator(name=name, token_hash=hash_token(token), is_admin=admin, created=time.time()))
    return token


def find_annotator(s: Session, name: str) -> Annotator:
    who = s.scalar(select(Annotator).where(Annotator.name == name))
    if who is None:
        raise Refused(404, "no annotator of that name")
    return who


def revoke_token(s: Session, name: str) -> dict:
    """Sign a person out for good: their token stops working at once and their held items go back
    to the pool. Their answers stay. `new_token` lets them back in with a fresh token."""
    with write_transaction(s):
        who = find_annotator(s, name)
        who.token_hash = revoked_hash()
        released = s.execute(delete(Lease).where(Lease.annotator_id == who.id)).rowcount
    return {"name": name, "revoked": True, "leases_released": released}


def new_token(s: Session, name: str) -> str:
    """A fresh sign-in token for an existing person; the old one stops working."""
    token = secrets.token_urlsafe(24)
    with write_transaction(s):
        find_annotator(s, name).token_hash = hash_token(token)
    return token


def authenticate(s: Session, token: str | None) -> Annotator | None:
    if not token or len(token) > 200:
        return None
    return s.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))


# ---- campaigns ----------------------------------------------------------------------------------

def read_campaign_file(path: str | Path) -> list[dict]:
    """What `alignloop sample` writes: {"item_id", "prompt", "responses": [...], "meta": {...}} per line."""
    return read_jsonl(path, required={"item_id": str, "prompt": str, "responses": list})


def campaign_name(path: Path) -> str:
    """The campaign a file becomes: same file contents -> same name (a rerun resumes it); a new
    round's file -> a new campaign."""
    path = Path(path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def open_campaign(s: Session, path: Path, mode: str, overlap: int) -> Campaign:
    """The campaign of this file (see `campaign_name`), created from it on first use.

    An existing campaign is returned as it is: its mode and overlap are the ones it was made with.
    Two processes opening the same file at once get the same campaign.
    """
    path = Path(path)
    name = campaign_name(path)
    found = s.scalar(select(Campaign).where(Campaign.name == name))
    if found is not None:
        return found
    rows = read_campaign_file(path)
    try:
        return create_campaign(s, name, rows, mode, overlap, source=str(path))
    except (Refused, Conflict):  # made by someone else since the lookup above
        found = s.scalar(select(Campaign).where(Campaign.name == name))
        if found is None:
            raise
        return found


def item_row(source: str, line: int, row: Any, mode: str) -> Item:
    """One campaign line checked and turned into an Item (not yet attached to a campaign)."""
    if not isinstance(row, dict):
        raise InputError(source, "expected a JSON object", line=line)
    check_fields(source, line, row, {"item_id": str, "prompt": str, "responses": list})
    for field, cap in (("item_id", MAX_ITEM_ID), ("prompt", MAX_TEXT)):
        if problem := text_problem(row[field], cap) or (None if row[field].strip() else "must not be empty"):
            raise InputError(source, problem, line=line, field=field)
    responses = row["responses"][:2] if mode == "pairwise" else row["responses"]  # pairwise: the first two
    if not 2 <= len(responses) <= MAX_RESPONSES:
        raise InputError(source, f"expected 2-{MAX_RESPONSES} responses, got {len(responses)}", line=line,
                         field="responses")
    if problem := next((p for p in (text_problem(r, MAX_TEXT, nul_ok=True) for r in responses) if p), None):
        raise InputError(source, f"each response: {problem}", line=line, field="responses")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError(source, "expected a JSON object", line=line, field="meta")
    if problem := json_problem(meta) or (None if len(json.dumps(meta)) <= MAX_META_CHARS
                                         else f"at most {MAX_META_CHARS} characters as JSON"):
        raise InputError(source, problem, line=line, field="meta")
    gold = row.get("gold")
    if gold is not None:
        try:
            gold = normalize_ranking(gold, len(responses))
        except Refused as e:
            raise InputError(source, str(e), line=line, field="gold") from None
    return Item(item_id=row["item_id"], prompt=row["prompt"], responses=responses, meta=meta,
                is_gold=gold is not None, gold=gold)


def create_campaign(s: Session, name: str, items: Sequence[dict], mode: str = "rank", overlap: int = 1,
                    lease_seconds: int = 900, source: str = "<upload>") -> Campaign:
    """Import items (checked line by line: errors name `source`, the line and the field)."""
    if mode not in MODES:
        raise Refused(422, f"mode must be one of {MODES}")
    if not valid_count(overlap, 1, 100) or not valid_count(lease_seconds, 10, 86400):
        raise Refused(422, "overlap must be 1-100 and lease_seconds 10-86400")
    name = check_text(name, "campaign name", MAX_CAMPAIGN_NAME).strip()
    if not items:
        raise InputError(source, "no items")
    if len(items) > MAX_ITEMS:
        raise InputError(source, f"at most {MAX_ITEMS} items per campaign (got {len(items)})")
    rows, seen = [], set()
    for n, row in enumerate(items, start=1):
        line = row["_line"] if isinstance(row, dict) and valid_count(row.get("_line"), 1, MAX_ID) else n
        item = item_row(source, line, row, mode)
        if item.item_id in seen:
            raise InputError(source, "duplicate item_id", line=line, field="item_id")
        seen.add(item.item_id)
        rows.append(item)
    with write_transaction(s):
        if s.scalar(select(Campaign.id).where(Campaign.name == name)):
            raise Refused(409, "a campaign of that name exists already")
        campaign = Campaign(name=name, mode=mode, overlap=overlap, lease_seconds=lease_seconds, created=time.time())
        s.add(campaign)
        s.flush()
        for item in rows:
            item.campaign_id = campaign.id
        s.add_all(rows)
    return campaign


def valid_count(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def set_overlap(s: Session, campaign_id: int, overlap: int) -> None:
    """Change N mid-campaign: lowering it never removes answers, raising it reopens finished items."""
    if not valid_count(overlap, 1, 100):
        raise Refused(422, "overlap must be 1-100")
    with write_transaction(s):
        get_campaign(s, campaign_id, lock=True).overlap = overlap


def list_campaigns(s: Session) -> list[dict]:
    return [{"id": c.id, "name": c.name, "mode": c.mode, "overlap": c.overlap,
             "items": s.scalar(select(func.count()).where(Item.campaign_id == c.id))}
            for c in s.scalars(select(Campaign).order_by(Campaign.id))]


def get_campaign(s: Session, campaign_id: int, lock: bool = False) -> Campaign:
    """The campaign, or Refused(404). `lock=True` (inside a write) serialises assignment per campaign
    on PostgreSQL & co with a row lock; on SQLite the write already holds the writer lock."""
    if not valid_id(campaign_id):
        raise Refused(404, "no such campaign")
    q = select(Campaign).where(Campaign.id == campaign_id)
    campaign = s.scalar(q.with_for_update() if lock else q)
    if campaign is None:
        raise Refused(404, "no such campaign")
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
    with write_transaction(s):
        campaign = get_campaign(s, campaign_id, lock=True)
        held = s.scalar(select(Lease).where(Lease.campaign_id == campaign_id, Lease.annotator_id == annotator.id)
                        .order_by(Lease.id))
        if held is not None:
            item = s.get(Item, held.item_pk)
            if held.expires > now or _has_room(s, campaign, item, annotator.id, now):
                held.expires = now + campaign.lease_seconds
                return _view(s, campaign, item, annotator)
            s.delete(held)  # expired and the slot went to someone else
        item = s.scalar(_open_items(campaign, annotator.id, now).order_by(Item.id).limit(1))
        if item is None:
            return None
        s.add(Lease(campaign_id=campaign_id, item_pk=item.id, annotator_id=annotator.id, issued=now,
                    expires=now + campaign.lease_seconds))
        s.flush()
        return _view(s, campaign, item, annotator)


def progress(s: Session, annotator: Annotator, campaign_id: int) -> dict:
    done = s.scalar(select(func.count()).where(Answer.campaign_id == campaign_id, Answer.annotator_id == annotator.id))
    campaign = get_campaign(s, campaign_id)
    left = s.scalar(select(func.count()).select_from(_open_items(campaign, annotator.id, time.time()).subquery()))
    return {"done": done, "left": left}


# ---- answers ------------------------------------------------------------------------------------

def is_index(value: Any, k: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < k


def normalize_ranking(ranking: Any, k: int) -> list:
    """Check that `ranking` places each of 0..k-1 exactly once; singletons as ints, tied groups sorted.

    The messages never quote the ranking sent: it may be huge, and errors must not echo input.
    """
    if not isinstance(ranking, list) or not ranking:
        raise Refused(422, "ranking must be a non-empty list of groups")
    if len(ranking) > k:
        raise Refused(422, f"ranking has more groups than the {k} responses")
    out, seen = [], []
    for group in ranking:
        members = [group] if not isinstance(group, list) else group
        if not members or len(members) > k or not all(is_index(i, k) for i in members):
            raise Refused(422, f"each ranking group must hold response positions 0..{k - 1}")
        seen += members
        out.append(members[0] if len(members) == 1 else sorted(members))
    if sorted(seen) != list(range(k)):
        raise Refused(422, f"ranking must place each of the {k} responses exactly once")
    return out


def check_answer_fields(strength: Any, reason: Any) -> None:
    """Strict, as the docs promise: strength is the int 1, 2 or 3 (not True, not 2.0)."""
    if strength is not None and not valid_count(strength, 1, 3):
        raise Refused(422, "strength must be 1, 2 or 3 (or absent)")
    if reason is not None:
        check_text(reason, "reason", MAX_REASON, empty_ok=True)


def leased_item(s: Session, annotator: Annotator, campaign_id: int, item_pk: Any) -> tuple[Item, Lease | None]:
    if not valid_id(item_pk):
        raise Refused(404, "no such item in this campaign")
    item = s.get(Item, item_pk)
    if item is None or item.campaign_id != campaign_id:
        raise Refused(404, "no such item in this campaign")
    lease = s.scalar(select(Lease).where(Lease.item_pk == item_pk, Lease.annotator_id == annotator.id))
    return item, lease


def submit_answer(s: Session, annotator: Annotator, campaign_id: int, item_pk: int, ranking: Any,
                  all_bad: bool = False, strength: int | None = None, reason: str | None = None) -> dict:
    """Record one answer; `ranking` is in *shown positions* (what the person saw), stored in response indices."""
    check_answer_fields(strength, reason)
    if not isinstance(all_bad, bool):
        raise Refused(422, "all_bad must be true or false")
    now = time.time()
    lease_ran_out = False
    with write_transaction(s):
        campaign = get_campaign(s, campaign_id, lock=True)
        item, lease = leased_item(s, annotator, campaign_id, item_pk)
        if s.scalar(select(Answer.id).where(Answer.item_pk == item_pk, Answer.annotator_id == annotator.id)):
            raise Refused(409, "you answered this item already (undo it first to change it)")
        if lease is None:
            raise Refused(409, "this item is not assigned to you; ask for the next item")
        k = len(item.responses)
        if all_bad:  # one tied group of all, whatever order was sent
            if ranking not in (None, []):
                normalize_ranking(ranking, k)
            ranking = [list(range(k))]
        positions = normalize_ranking(ranking, k)
        if lease.expires <= now and not _has_room(s, campaign, item, annotator.id, now):
            s.delete(lease)  # committed: the slot is someone else's now
            lease_ran_out = True
        else:
            order = shown_order(annotator.id, item)
            stored = [order[g] if isinstance(g, int) else sorted(order[p] for p in g) for g in positions]
            answer = Answer(campaign_id=campaign_id, item_pk=item_pk, annotator_id=annotator.id, ranking=stored,
                            shown_order=order, all_bad=all_bad, strength=strength, reason=(reason or None),
                            seconds=now - lease.issued, created=now)
            s.add(answer)
            s.delete(lease)
    if lease_ran_out:
        raise Refused(409, "your lease on this item ran out and it went to someone else")
    done = s.scalar(select(func.count()).where(Answer.campaign_id == campaign_id, Answer.annotator_id == annotator.id))
    return {"answer": answer.id, "ranking": stored, "done": done}


def skip_item(s: Session, annotator: Annotator, campaign_id: int, item_pk: int) -> None:
    """Never show this item to this person again; its slot returns to the pool."""
    with write_transaction(s):
        get_campaign(s, campaign_id, lock=True)
        _, lease = leased_item(s, annotator, campaign_id, item_pk)
        if lease is None:
            raise Refused(409, "this item is not assigned to you")
        s.delete(lease)
        s.add(Skip(campaign_id=campaign_id, item_pk=item_pk, annotator_id=annotator.id, created=time.time()))


def undo_last(s: Session, annotator: Annotator, campaign_id: int) -> dict:
    """Delete this person's latest answer in the campaign and hand the item straight back to them."""
    with write_transaction(s):
        campaign = get_campaign(s, campaign_id, lock=True)
        answer = s.scalar(select(Answer).where(Answer.campaign_id == campaign_id, Answer.annotator_id == annotator.id)
                          .order_by(Answer.id.desc()))
        if answer is None:
            raise Refused(409, "nothing to undo")
        now = time.time()
        s.execute(delete(Lease).where(Lease.campaign_id == campaign_id, Lease.annotator_id == annotator.id))
        s.delete(answer)  # frees this person's slot, taken again at once by the lease below
        s.add(Lease(campaign_id=campaign_id, item_pk=answer.item_pk, annotator_id=annotator.id, issued=now,
                    expires=now + campaign.lease_seconds))
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
    campaign = get_campaign(s, campaign_id)
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
        campaign = get_campaign(s, campaign_id)
        per_item = s.execute(select(Item.id, func.count(Answer.id)).outerjoin(Answer, Answer.item_pk == Item.id)
                             .where(Item.campaign_id == campaign_id).group_by(Item.id)).all()
        return sum(min(n, campaign.overlap) for _, n in per_item), len(per_item) * campaign.overlap
