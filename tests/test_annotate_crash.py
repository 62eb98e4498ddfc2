"""SIGKILL a real `alignloop annotate serve` while 20 people answer, restart it, three times:
every acknowledged answer is stored, none twice, no item past its overlap. SQLite and PostgreSQL."""

import os
from collections import Counter
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from alignloop.annotate import service
from alignloop.annotate.db import Answer, get_sessionmaker
from alignloop.annotate.simulate import run_http_annotators

from test_annotate_http import campaign_items
from test_annotate_service import db_url  # noqa: F401  (the SQLite / PostgreSQL fixture)

ROUNDS = 3
PEOPLE = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, port: int, log) -> subprocess.Popen:
    """`alignloop annotate serve` in its own process; returns once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "annotate", "serve", "--db", url,
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log)
    deadline = time.time() + 90  # the CLI imports the whole package (torch included) first
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/me", timeout=1).status_code == 401:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def stored_answers(Session) -> int:
    with Session() as s:
        return s.scalar(select(func.count(Answer.id)))


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_answer(db_url, tmp_path):  # noqa: F811
    Session = get_sessionmaker(db_url)
    with Session() as s:
        tokens = [service.create_annotator(s, f"p{n}") for n in range(PEOPLE)]
        cid = service.create_campaign(s, "crash", campaign_items(400, k=4), overlap=2).id
    rng = random.Random(23)
    acknowledged: list[int] = []
    per_round = []
    with open(tmp_path / "server.log", "w") as log:
        for round_no in range(ROUNDS):
            port = free_port()
            server = start_server(db_url, port, log)
            result: dict = {}
            people = threading.Thread(target=lambda: result.update(
                people=run_http_annotators(f"http://127.0.0.1:{port}", tokens, cid, answers=10_000, deadline_s=60)))
            people.start()
            answers_before = stored_answers(Session)
            deadline = time.time() + 60
            while stored_answers(Session) == answers_before:  # the load has begun (a slow machine takes a while)
                assert time.time() < deadline and people.is_alive(), "no answer reached the server"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.5, 1.5))  # mid-load: requests are in flight when it dies
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            people.join(timeout=60)
            assert not people.is_alive()
            got = [a for p in result["people"] for a in p.acknowledged]
            errors = [p.error for p in result["people"] if p.error]
            assert errors, "the kill came after the load: nobody saw the server die"
            per_round.append(len(got))
            acknowledged += got
    with Session() as s:
        stored = set(s.scalars(select(Answer.id)))
        pairs = s.execute(select(Answer.item_pk, Answer.annotator_id)).all()
    most = max(Counter(item for item, _ in pairs).values())
    print(f"SIGKILL x{ROUNDS} on {db_url.split(':')[0]}: acknowledged per round {per_round}, "
          f"stored {len(stored)}, unacknowledged but stored {len(stored - set(acknowledged))}")
    assert all(n > 0 for n in per_round), per_round  # each round really was under load
    assert len(acknowledged) == len(set(acknowledged))
    assert set(acknowledged) <= stored  # none lost
    assert len(pairs) == len(set(pairs))  # nobody answered an item twice
    assert most <= 2  # never more than the overlap
