"""Tables of the annotation app and the engine that holds them.

SQLite by default (WAL, so readers never wait for the writer), any SQLAlchemy
URL otherwise. On SQLite every transaction starts with BEGIN IMMEDIATE: it
takes the write lock up front, so two annotators asking for work at the same
moment are served one after the other and can never both take an item's last
slot. Other databases get the same guarantee from a row lock on the campaign
(`service._lock_campaign`).

Times are Unix seconds (floats): portable across databases, no time zones.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the token; the token is never stored
    is_admin: Mapped[bool] = mapped_column(default=False)
    created: Mapped[float]


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    mode: Mapped[str] = mapped_column(String(10))  # "rank" (all K responses) or "pairwise" (the first two)
    overlap: Mapped[int]  # distinct annotators per item; may change mid-campaign
    lease_seconds: Mapped[int]  # how long an item is held for one person before it returns to the pool
    created: Mapped[float]


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("campaign_id", "item_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    item_id: Mapped[str] = mapped_column(String(200))  # the campaign file's id, stable across rounds
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list] = mapped_column(JSON)
    meta: Mapped[dict] = mapped_column(JSON)
    is_gold: Mapped[bool] = mapped_column(default=False)  # gold items go to every annotator, overlap aside
    gold: Mapped[Any] = mapped_column(JSON, nullable=True)  # the known ranking of a gold item


class Lease(Base):
    """An item held for one annotator until `expires`; counts against the item's overlap while live."""

    __tablename__ = "leases"
    __table_args__ = (UniqueConstraint("item_pk", "annotator_id"), Index("ix_leases_campaign", "campaign_id", "annotator_id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    item_pk: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    issued: Mapped[float]
    expires: Mapped[float]


class Answer(Base):
    __tablename__ = "answers"
    # The database itself refuses a second answer by one person to one item.
    __table_args__ = (UniqueConstraint("item_pk", "annotator_id"), Index("ix_answers_campaign", "campaign_id", "annotator_id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    item_pk: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    ranking: Mapped[list] = mapped_column(JSON)  # groups best first, in the item's response indices
    shown_order: Mapped[list] = mapped_column(JSON)  # shown_order[p] = response index shown at position p
    all_bad: Mapped[bool] = mapped_column(default=False)
    strength: Mapped[int | None]  # optional 1-3: slightly / clearly / much better
    reason: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float]  # from lease to answer, measured by the server
    created: Mapped[float]


class Skip(Base):
    __tablename__ = "skips"
    __table_args__ = (UniqueConstraint("item_pk", "annotator_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    item_pk: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    created: Mapped[float]


def normalize_url(db: str | Path) -> str:
    """A SQLAlchemy URL, or a plain file path meaning SQLite."""
    db = str(db)
    return db if "://" in db else f"sqlite:///{db}"


@functools.lru_cache(maxsize=16)
def get_engine(db: str) -> Engine:
    """One engine per URL per process (tables created on first use)."""
    url = normalize_url(db)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # sqlite3 must not BEGIN on its own; we do it below
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed answer survives an app crash
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        # One writer at a time in this process, queued on a lock: SQLite's own busy handler makes
        # waiters sleep and poll (up to 100 ms a try), which was most of the tail latency under load.
        # The timeout only guards against a caller nesting two sessions in one thread; then SQLite's
        # busy timeout decides as before.
        writer = threading.Lock()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.info["writer"] = writer.acquire(timeout=30)
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except Exception:  # e.g. another process held the file past the busy timeout
                if conn.info.pop("writer", False):
                    writer.release()
                raise

        @event.listens_for(engine, "commit")
        @event.listens_for(engine, "rollback")
        def _end(conn):
            if conn.info.pop("writer", False):
                writer.release()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    return engine


def get_sessionmaker(db: str | Path) -> sessionmaker:
    return sessionmaker(get_engine(normalize_url(db)), expire_on_commit=False)
