"""Tables of the annotation app, the engine that holds them, and the one way to write.

SQLite by default, any SQLAlchemy URL otherwise (PostgreSQL is tested).

Reads and writes are different transactions. A read (`Session()` used as is)
never takes a lock: on SQLite it is a deferred transaction in WAL mode, which
reads a snapshot while a writer works, and it is opened `query_only`, so a
write that forgot `write_transaction` fails loudly instead of racing.

Every write goes through `write_transaction(s)`. On SQLite it takes this
process's writer lock (bounded wait), then `BEGIN IMMEDIATE`, does its
statements in the calling thread and commits and releases before it returns:
the lock is never held across a thread hop, a network send or a client. So two
annotators asking for work at the same moment are served one after the other
and can never both take an item's last slot. Other databases get the same
guarantee from a row lock on the campaign (`service.get_campaign(..., lock=True)`).

Times are Unix seconds (floats): portable across databases, no time zones.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..errors import AlignloopError, InputError


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


MAX_ID = 2**63 - 1  # the largest integer every supported database stores; a bigger id names nothing
WRITER_WAIT_S = 10.0  # a write that cannot start within this is refused (503), not queued for ever
# Enough connections for every worker thread of the server (40) at once, so none waits for the pool.
POOL = {"pool_size": 10, "max_overflow": 40, "pool_timeout": 10}
WRITE_OPTION = "alignloop_write"  # connection execution option: this transaction may write


WRITER_LOCKS: "weakref.WeakKeyDictionary[Engine, threading.Lock]" = weakref.WeakKeyDictionary()  # SQLite engines only


class Busy(AlignloopError):
    """The database could not take a write in time (the routes answer 503 with Retry-After)."""


class Conflict(AlignloopError):
    """A write collided with a concurrent one on a unique constraint (the routes answer 409)."""


def normalize_url(db: str | Path) -> str:
    """A SQLAlchemy URL, or a plain file path meaning SQLite."""
    db = str(db)
    return db if "://" in db else f"sqlite:///{db}"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and for :memory:)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


def create_private_file(path: Path) -> None:
    """Create `path` readable by its owner only, unless it exists (the database holds everyone's answers).

    SQLite gives its -wal and -shm files the main file's permissions, so they are private too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def sqlite_engine(url: str) -> Engine:
    path = sqlite_path(url)
    if path is not None:
        create_private_file(path)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **POOL)
    # One writer at a time in this process, queued on a lock: SQLite's own busy handler makes
    # waiters sleep and poll (up to 100 ms a try), which was most of the tail latency under load.
    WRITER_LOCKS[engine] = threading.Lock()

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # sqlite3 must not BEGIN on its own; `_begin` does
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed answer survives an app crash
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        writes = bool(conn.get_execution_options().get(WRITE_OPTION))
        # query_only makes a write outside write_transaction an error instead of an unlocked race.
        conn.exec_driver_sql(f"PRAGMA query_only={'OFF' if writes else 'ON'}")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

    return engine


def writer_lock(engine: Engine) -> threading.Lock | None:
    return WRITER_LOCKS.get(engine)


@functools.lru_cache(maxsize=16)
def get_engine(db: str) -> Engine:
    """One engine per URL per process (tables created on first use). A URL SQLAlchemy cannot use, a
    database file that cannot be created or a server that does not answer raise InputError naming the
    URL (its password hidden): they are the user's input, met before anything is read or written."""
    url = normalize_url(db)
    try:
        engine = sqlite_engine(url) if url.startswith("sqlite") else create_engine(url, pool_pre_ping=True, **POOL)
        with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
            Base.metadata.create_all(conn)
    except (ArgumentError, NoSuchModuleError, ValueError) as e:  # ValueError: a URL SQLAlchemy cannot parse
        raise InputError(shown_url(url), f"not a database URL this install can use ({first_line(e)}): give "
                                         "sqlite:///FILE, a plain file path, or postgresql+psycopg://...") from None
    except OSError as e:
        raise InputError(shown_url(url), f"cannot create the database file ({e.strerror or e})") from None
    except DBAPIError as e:
        raise InputError(shown_url(url), f"cannot open the database ({first_line(e.orig or e)})") from None
    return engine


def shown_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url.split("@", 1)[-1] if "@" in url else url  # whatever came before '@' may hold a password


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def get_sessionmaker(db: str | Path) -> sessionmaker:
    return sessionmaker(get_engine(normalize_url(db)), expire_on_commit=False)


@contextlib.contextmanager
def write_transaction(s: Session) -> Iterator[Session]:
    """One write: the writer lock (SQLite), the statements, a commit; rolled back on any error.

    A read transaction still open on `s` is ended first: a write must start from the newest data,
    and SQLite cannot turn a read snapshot into a write once another writer has committed.
    A unique-constraint collision raises `Conflict`; a database that stays locked raises `Busy`.
    """
    if s.in_transaction():
        s.commit()
    lock = writer_lock(s.get_bind())
    if lock is not None and not lock.acquire(timeout=WRITER_WAIT_S):
        raise Busy("the database is busy; try again in a moment")
    try:
        s.connection(execution_options={WRITE_OPTION: True})
        yield s
        s.commit()
    except IntegrityError:
        s.rollback()
        raise Conflict("this conflicts with a change made at the same moment; reload and try again") from None
    except OperationalError as e:
        s.rollback()
        if "locked" in str(e).lower() or "busy" in str(e).lower():
            raise Busy("the database is busy; try again in a moment") from None
        raise
    except BaseException:
        s.rollback()
        raise
    finally:
        if lock is not None:
            lock.release()
