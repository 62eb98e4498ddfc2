"""The server under abuse, on real uvicorn: bursts, slow readers, huge bodies, hostile values, headers.

Each test names a class of fault from issue 23 and checks the whole class: every request gets an
answer below 500 within a bound, other people are served meanwhile, and refused requests leave
every table as it was.
"""

import asyncio
import json
import os
import socket
import stat
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from alignloop.annotate import service
from alignloop.annotate.app import MAX_BODY_BYTES, MAX_IN_FLIGHT_PER_TOKEN, SECURITY_HEADERS, BackgroundServer, create_app
from alignloop.annotate.cli import app as annotate_cli
from alignloop.annotate.db import Answer, Busy, Lease, get_sessionmaker, write_transaction
from alignloop.annotate import db as annotate_db

from test_annotate_http import admin_and_two_annotators, campaign_items, snapshot


@pytest.fixture
def server_db(tmp_path):
    """A SQLite database with an admin, two annotators and one campaign (overlap 2, 40 items of 3)."""
    url = f"sqlite:///{tmp_path / 'srv.db'}"
    Session = get_sessionmaker(url)
    with Session() as s:
        tokens = admin_and_two_annotators(s)
        cid = service.create_campaign(s, "c", campaign_items(40), overlap=2).id
    auth = {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}
    return url, Session, auth, cid


async def burst(base: str, headers: dict, path: str, n: int) -> tuple[list, float]:
    """`n` requests at once, each on its own connection; (status codes or error names, seconds)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as client:
        async def one():
            try:
                return (await client.get(path)).status_code
            except httpx.HTTPError as e:
                return type(e).__name__
        start = time.perf_counter()
        codes = await asyncio.gather(*(one() for _ in range(n)))
        return list(codes), time.perf_counter() - start


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def test_a_burst_from_one_token_is_answered_fast_and_others_are_served_meanwhile(server_db):
    """Issue: ~42 simultaneous GET /api/me with one token stalled everyone ~30 s and half came back 500."""
    url, Session, auth, cid = server_db
    with BackgroundServer(url) as base:
        other = httpx.Client(base_url=base, headers=auth["bob"], timeout=30)
        served = []

        def bob_works():  # another person, asking for work and answering, while the burst runs
            while len(served) < 5:
                (view, seconds) = timed(lambda: other.get(f"/api/campaigns/{cid}/next"))
                r = other.post(f"/api/campaigns/{cid}/answers", json={"item": view.json()["item"], "ranking": [0, 1, 2]})
                served.append((view.status_code, r.status_code, seconds))

        bob = threading.Thread(target=bob_works)
        bob.start()
        for path in ("/api/me", f"/api/campaigns/{cid}/next", "/api/campaigns"):
            codes, seconds = asyncio.run(burst(base, auth["ann"], path, 200))
            assert set(codes) <= {200, 429}, sorted(set(map(str, codes)))
            assert codes.count(200) >= MAX_IN_FLIGHT_PER_TOKEN  # refused only past the per-person cap
            assert seconds < 15, f"200 concurrent {path} took {seconds:.1f} s"
            print(f"burst of 200 {path}: {codes.count(200)} x 200, {codes.count(429)} x 429 in {seconds:.2f} s")
        bob.join(timeout=60)
        other.close()
    print(f"meanwhile bob: {len(served)} items fetched and answered, slowest GET /next {max(s for *_, s in served):.2f} s")
    assert [(a, b) for a, b, _ in served] == [(200, 201)] * 5
    assert max(s for _, _, s in served) < 5  # nobody else waits on the burst
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Lease)) <= 2  # ann's bursts held one lease, bob one


def test_a_reader_that_never_reads_an_export_blocks_nobody(server_db):
    """Issue: an admin export left unread for 15 s made every annotator's GET /next time out."""
    url, Session, auth, cid = server_db
    big = "w" * 60_000  # 40 items x 3 responses x 60 kB x 2 answers: a 14 MB export, past any socket buffer
    with Session() as s:
        items = [{"item_id": f"b{i}", "prompt": "p", "responses": [big + str(j) for j in range(3)]} for i in range(40)]
        big_cid = service.create_campaign(s, "big", items, overlap=2).id
        for who in ("ann", "bob"):
            person = service.find_annotator(s, who)
            while (view := service.next_item(s, person, big_cid)) is not None:
                service.submit_answer(s, person, big_cid, view["item"], [0, 1, 2])
    with BackgroundServer(url) as base:
        host, port = base.removeprefix("http://").split(":")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: the server must wait on us
        slow.connect((host, int(port)))
        slow.sendall(f"GET /api/admin/campaigns/{big_cid}/export HTTP/1.1\r\nHost: x\r\n"
                     f"{'Authorization: ' + auth['admin']['Authorization']}\r\n\r\n".encode())
        time.sleep(1.0)  # the export is now stuck in flight, unread
        with httpx.Client(base_url=base, headers=auth["ann"], timeout=10) as ann:
            timings = []
            for _ in range(5):
                view, seconds = timed(lambda: ann.get(f"/api/campaigns/{cid}/next"))
                r = ann.post(f"/api/campaigns/{cid}/answers", json={"item": view.json()["item"], "ranking": [2, 1, 0]})
                timings.append(seconds)
                assert (view.status_code, r.status_code) == (200, 201)
        assert max(timings) < 2, timings
        print(f"export unread: 5 x GET /next + answer by another person, slowest {max(timings):.2f} s")
        # and the export, read at last, is whole and is the snapshot taken when it was asked for
        slow.settimeout(30)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        received = bytearray()
        while chunk := slow.recv(1 << 20):
            received += chunk
            if received.endswith(b"0\r\n\r\n"):
                break
        slow.close()
        data = bytes(received)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    lines = dechunk(body).decode().splitlines()
    print(f"export read at last: {len(data) / 1e6:.1f} MB, {len(lines)} lines")
    assert len(lines) == 80 and all(json.loads(line)["campaign"] == "big" for line in lines)


def dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        n = int(body[at:end], 16)
        if n == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + n]
        at = end + 2 + n + 2


def raw_request(base: str, head: str, body: bytes = b"", read_timeout: float = 10) -> tuple[int, bytes, float]:
    """Send one request by hand (headers that lie about the body are the point); (status, response, seconds)."""
    host, port = base.removeprefix("http://").split(":")
    start = time.perf_counter()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        sock.settimeout(read_timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
    return int(data.split(b" ", 2)[1]), data, time.perf_counter() - start


def test_bodies_are_limited_before_they_are_read_or_parsed(server_db):
    """Issue: a 50 MB body was read and parsed before the token was checked; 26 M ints cost 1.1 GB."""
    url, Session, auth, cid = server_db
    before = snapshot(Session)
    token = auth["ann"]["Authorization"]
    with BackgroundServer(url) as base:
        # Announced as 50 MB, nothing sent: refused at once, from the headers alone, token or not.
        for who in (token, "Bearer nope", None):
            head = (f"POST /api/campaigns/{cid}/answers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: 50000000" + (f"\r\nAuthorization: {who}" if who else ""))
            status, _, seconds = raw_request(base, head)
            assert status == 413 and seconds < 2
        # No token: refused before the body is read (a body that never comes does not hold the answer up).
        status, _, seconds = raw_request(base, f"POST /api/campaigns/{cid}/answers HTTP/1.1\r\nHost: x\r\n"
                                               "Content-Type: application/json\r\nContent-Length: 1000")
        assert status == 401 and seconds < 2
        # Chunked, with no length announced: cut off once it passes the limit.
        with httpx.Client(base_url=base, headers=auth["ann"], timeout=30) as c:
            def chunks():
                yield b'{"item": 1, "ranking": [[' + b"0," * 10
                for _ in range(200):
                    yield b"0," * 5000
            assert c.post(f"/api/campaigns/{cid}/answers", content=chunks(),
                          headers={"content-type": "application/json"}).status_code == 413
            # the 26-million-integer tie group, and one that fits the byte limit but not the list caps
            tie = json.dumps({"item": 1, "ranking": [[0] * 20_000]}).encode()
            assert len(tie) < MAX_BODY_BYTES
            r = c.post(f"/api/campaigns/{cid}/answers", content=tie, headers={"content-type": "application/json"})
            assert r.status_code == 422 and len(r.content) < 2000  # refused, and the body is not echoed
            big = json.dumps({"item": 1, "ranking": [[0] * 26_000_000]}).encode()
            r = c.post(f"/api/campaigns/{cid}/answers", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413
            # An admin's campaign upload has its own, larger limit, and a campaign past it is refused too.
            admin = {**auth["admin"], "content-type": "application/json"}
            huge = json.dumps({"name": "huge", "items": campaign_items(10)}).encode() + b" " * (17 << 20)
            assert c.post("/api/admin/campaigns", content=huge, headers=admin).status_code == 413
    assert snapshot(Session) == before


MARK = "ECHO-MARK-7f3a"  # an error that echoed the input would contain this


def hostile_requests(cid: int, item: int) -> list[tuple[str, str, object]]:
    """(method, path, JSON text or None): values that used to give 500s, and their relatives."""
    answers = f"/api/campaigns/{cid}/answers"
    big_ints = [2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]
    out = [("GET", f"/api/campaigns/{n}/next", None) for n in big_ints + [0, -1]]
    out += [("POST", f"/api/campaigns/{2 ** 63}/skip", '{"item": 1}'),
            ("GET", f"/api/admin/campaigns/{2 ** 63}/stats", None),
            ("GET", f"/api/admin/campaigns/{2 ** 63}/export", None),
            ("PATCH", f"/api/admin/campaigns/{2 ** 64}", '{"overlap": 2}')]
    out += [("POST", answers, json.dumps({"item": n, "ranking": [0, 1, 2]})) for n in big_ints]
    out += [("POST", answers, f'{{"item": {v}, "ranking": [0, 1, 2]}}') for v in ("NaN", "Infinity", "-Infinity", "1e400")]
    out += [("POST", answers, '{"item": %d, "ranking": [0, 1, 2], "reason": "%s"}' % (item, s))
            for s in ("\\ud800", "\\udfff", "a\\u0000b", "\\ud800" * 1000)]
    out += [("POST", answers, json.dumps({"item": item, "ranking": [0, 1, 2], "strength": v}))
            for v in (True, False, 2.0, "2", 0, 4, 2 ** 63, [2])]
    out += [("POST", answers, json.dumps({"item": item, "ranking": [[0, 1, 2], [MARK]]})),
            ("POST", answers, json.dumps({"item": item, "ranking": [0, 1, 2], MARK * 100: 1})),
            ("POST", answers, '{"item": %d, "ranking": [0, 1, 2], "\\ud800": 1}' % item),
            ("POST", answers, "[" * 5000 + "]" * 5000),
            ("POST", answers, '{"item": %d, "ranking": [0, 1, 2], "all_bad": NaN}' % item)]
    admin_bad_items = [
        {"item_id": "x", "prompt": "\ud800", "responses": ["a", "b"]},
        {"item_id": "x", "prompt": "p\x00", "responses": ["a", "b"]},
        {"item_id": "x", "prompt": "p", "responses": ["a", "\udc00"]},
        {"item_id": "x", "prompt": "p", "responses": ["a", "b"], "meta": {"\ud800": 1}},
        {"item_id": "x", "prompt": "p", "responses": ["a", "b"], "meta": {"n": float("nan")}},
        {"item_id": "x", "prompt": "p", "responses": ["a", "b"], "meta": {"n": 2 ** 70}},
        {"item_id": "x", "prompt": "p", "responses": ["a", "b"], "meta": {"d": [[[[[[[[[[[1]]]]]]]]]]]}},
        {"item_id": "x", "prompt": "p", "responses": ["a", "b"], "gold": [[0] * 10 ** 4]},
        {"item_id": "x" * 10 ** 4, "prompt": "p", "responses": ["a", "b"]},
        {"item_id": "x", "prompt": "p", "responses": ["a"] * 1000},
        {"item_id": "x", "prompt": "p", "responses": ["a"], "_line": MARK},  # an error must not quote _line
    ]
    out += [("POST", "/api/admin/campaigns", json.dumps({"name": "bad", "items": [it]}, allow_nan=True))
            for it in admin_bad_items]
    out += [("POST", "/api/admin/campaigns", json.dumps({"name": n, "items": campaign_items(1)}))
            for n in ("\ud800", "x\x00", " ", "n" * 201)]
    out += [("POST", "/api/admin/annotators", json.dumps({"name": n})) for n in ("\ud800", "e\x00ve", "\udfffx", "")]
    out += [("GET", f"/api/campaigns/{cid}/answers?annotator=%ED%A0%80", None),
            ("GET", f"/api/campaigns/{cid}/answers?annotator={'x' * 500}", None),
            ("GET", f"/api/campaigns/{cid}/answers?annotator={MARK}", None)]
    return out


def test_hostile_values_get_4xx_never_500_never_an_echo_and_change_nothing(server_db):
    """Issue: ints >= 2^63 in a path or in `item`, NaN as `item`, lone surrogates in `reason` or a name: 500s."""
    url, Session, auth, cid = server_db
    client = TestClient(create_app(url))
    item = client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"]).json()["item"]
    before = snapshot(Session)
    requests = hostile_requests(cid, item)
    for method, path, body in requests:
        headers = {**auth["admin" if "/admin/" in path or "annotator=" in path else "ann"],
                   "content-type": "application/json"}
        r = client.request(method, path, content=None if body is None else body.encode("utf-8", "surrogatepass"),
                           headers=headers)
        assert 400 <= r.status_code < 500, (method, path, (body or "")[:300], r.status_code, r.text[:200])
        assert MARK not in r.text and len(r.content) < 4000, (path, r.text[:200])
        json.loads(r.text)  # always a JSON error, never a traceback page
    assert snapshot(Session) == before
    assert len(requests) == 57  # the count reported in docs/reliability.md


def test_strength_and_indices_are_strict(server_db):
    """The docs say submissions are checked strictly: true is not 1 and 2.0 is not 2."""
    url, Session, auth, cid = server_db
    client = TestClient(create_app(url))
    item = client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"]).json()["item"]
    post = lambda body: client.post(f"/api/campaigns/{cid}/answers", headers=auth["ann"], json=body)  # noqa: E731
    for bad in (True, 2.0, "2", 0, 4):
        assert post({"item": item, "ranking": [0, 1, 2], "strength": bad}).status_code == 422
    assert post({"item": item, "ranking": [0, True, 2]}).status_code == 422
    assert post({"item": float(item), "ranking": [0, 1, 2]}).status_code == 422
    with Session() as s:
        ann = service.find_annotator(s, "ann")
        for bad in (True, 2.0):  # and the service refuses them too, for in-process callers
            with pytest.raises(service.Refused):
                service.submit_answer(s, ann, cid, item, [0, 1, 2], strength=bad)
    r = post({"item": item, "ranking": [0, 1, 2], "strength": 2})
    assert r.status_code == 201
    with Session() as s:
        stored = s.scalar(select(Answer.strength))
    assert stored == 2 and type(stored) is int


def test_security_headers_on_every_response_5xx_included(server_db):
    """Issue: /admin could be framed by any site, and 5xx responses carried no security headers."""
    url, Session, auth, cid = server_db
    app = create_app(url)

    @app.get("/api/test-crash")
    def crash():
        raise RuntimeError("a bug")

    client = TestClient(app)
    expected = {k.decode(): v.decode() for k, v in SECURITY_HEADERS}
    assert "frame-ancestors 'none'" in expected["content-security-policy"] and expected["x-frame-options"] == "DENY"
    responses = {
        "page": client.get("/admin"), "static": client.get("/static/style.css"), "schema": client.get("/openapi.json"),
        "401": client.get("/api/me"), "403": client.get(f"/api/admin/campaigns/{cid}/stats", headers=auth["ann"]),
        "404": client.get("/nope"), "413": client.post("/api/me", content=b"x" * (MAX_BODY_BYTES + 1), headers=auth["ann"]),
        "422": client.get("/api/campaigns/x/next", headers=auth["ann"]),
        "500": client.get("/api/test-crash", headers=auth["ann"]),
    }
    assert responses["500"].status_code == 500 and "a bug" not in responses["500"].text
    for name, r in responses.items():
        assert str(r.status_code) == name or name in ("page", "static", "schema")
        for key, value in expected.items():
            assert r.headers.get(key) == value, (name, key)


def test_the_database_file_is_private(tmp_path):
    """Issue: the database (every token hash and answer) was created world-readable."""
    url = f"sqlite:///{tmp_path / 'sub' / 'private.db'}"
    Session = get_sessionmaker(url)
    with Session() as s:
        service.create_annotator(s, "ann")
    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / "sub" / f"private.db{suffix}"
        if path.exists():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, suffix


def test_reads_never_wait_for_the_writer_and_a_stuck_writer_gives_busy(server_db, monkeypatch):
    """A write in progress (holding the lock) must not stop reads; a write that cannot start says Busy."""
    url, Session, auth, cid = server_db
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with Session() as s, write_transaction(s):
            holding.set()
            release.wait(30)

    writer = threading.Thread(target=hold_the_lock)
    writer.start()
    assert holding.wait(10)
    try:
        monkeypatch.setattr(annotate_db, "WRITER_WAIT_S", 0.3)
        with Session() as s:
            (campaigns, seconds) = timed(lambda: service.list_campaigns(s))
            ann = service.authenticate(s, auth["ann"]["Authorization"].split()[1])
            assert campaigns and ann.name == "ann" and seconds < 1
            assert service.progress(s, ann, cid)["left"] == 40
            with pytest.raises(Busy):
                service.next_item(s, ann, cid)
        client = TestClient(create_app(url))
        assert client.get("/api/me", headers=auth["ann"]).status_code == 200
        r = client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"])
        assert r.status_code == 503 and r.headers["retry-after"]
    finally:
        release.set()
        writer.join()
    with Session() as s:  # and a write that forgets write_transaction fails instead of racing
        s.add(service.Skip(campaign_id=cid, item_pk=1, annotator_id=1, created=0.0))
        with pytest.raises(Exception, match="readonly"):
            s.flush()


def test_revoke_stops_a_token_at_once_and_frees_its_items(server_db):
    """Issue: there was no command to revoke a person's token."""
    url, Session, auth, cid = server_db
    client = TestClient(create_app(url))
    assert client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"]).status_code == 200
    view = client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"]).json()
    client.post(f"/api/campaigns/{cid}/answers", headers=auth["ann"], json={"item": view["item"], "ranking": [0, 1, 2]})
    client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"])  # holds a lease again
    runner = CliRunner()
    db = url.removeprefix("sqlite:///")
    result = runner.invoke(annotate_cli, ["revoke", "ann", "--db", db])
    assert result.exit_code == 0 and json.loads(result.output)["leases_released"] == 1
    assert client.get("/api/me", headers=auth["ann"]).status_code == 401
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Answer)) == 1  # the answer stays
        assert s.scalar(select(func.count()).select_from(Lease)) == 0
    result = runner.invoke(annotate_cli, ["new-token", "ann", "--db", db])
    token = json.loads(result.output)["token"]
    assert client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()["name"] == "ann"
    assert client.get("/api/me", headers=auth["ann"]).status_code == 401
    result = runner.invoke(annotate_cli, ["revoke", "nobody", "--db", db])
    assert result.exit_code != 0
