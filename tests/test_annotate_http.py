"""HTTP routes: roles, refusals that leave the database unchanged, and concurrent answers on real uvicorn
(SQLite and PostgreSQL)."""

import json
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from alignloop.annotate import service
from alignloop.annotate.app import BackgroundServer, create_app
from alignloop.annotate.db import Base, get_sessionmaker
from alignloop.annotate.simulate import run_http_annotators

from test_annotate_service import db_url  # noqa: F401  (the SQLite / PostgreSQL fixture)


def campaign_items(n, k=3):
    return [{"item_id": f"i{i}", "prompt": f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(k)], "meta": {}}
            for i in range(n)]


def snapshot(Session):
    """Every row of every table, to compare before and after a refused request."""
    with Session() as s:
        return {t.name: [tuple(r) for r in s.execute(select(t).order_by(*t.primary_key.columns))]
                for t in Base.metadata.sorted_tables}


def admin_and_two_annotators(s) -> dict[str, str]:
    """Sign-in tokens of an admin ('admin') and two annotators ('ann', 'bob')."""
    return {"admin": service.create_annotator(s, "admin", admin=True),
            "ann": service.create_annotator(s, "ann"), "bob": service.create_annotator(s, "bob")}


@pytest.fixture
def setup(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    Session = get_sessionmaker(url)
    with Session() as s:
        tokens = admin_and_two_annotators(s)
    client = TestClient(create_app(url))
    auth = {n: {"Authorization": f"Bearer {t}"} for n, t in tokens.items()}
    r = client.post("/api/admin/campaigns", headers=auth["admin"],
                    json={"name": "c1", "mode": "rank", "overlap": 2, "items": campaign_items(4)})
    assert r.status_code == 201
    return client, auth, Session, r.json()["id"]


def test_roles_and_answer_privacy(setup):
    client, auth, Session, cid = setup
    assert client.get("/api/me").status_code == 401
    assert client.get("/api/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    view = client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"]).json()
    r = client.post(f"/api/campaigns/{cid}/answers", headers=auth["ann"], json={"item": view["item"], "ranking": [2, 0, 1]})
    assert r.status_code == 201
    before = snapshot(Session)
    refused = [
        client.get(f"/api/campaigns/{cid}/answers?annotator=ann", headers=auth["bob"]),  # another person's answers
        client.get(f"/api/admin/campaigns/{cid}/export", headers=auth["ann"]),  # export without admin rights
        client.get(f"/api/admin/campaigns/{cid}/export?kind=pairs", headers=auth["bob"]),
        client.get(f"/api/admin/campaigns/{cid}/stats", headers=auth["ann"]),
        client.post("/api/admin/campaigns", headers=auth["ann"], json={"name": "x", "items": campaign_items(1)}),
        client.post("/api/admin/annotators", headers=auth["ann"], json={"name": "eve", "admin": True}),
        client.patch(f"/api/admin/campaigns/{cid}", headers=auth["bob"], json={"overlap": 5}),
        client.post(f"/api/campaigns/{cid}/undo", headers=auth["bob"]),  # bob has nothing to undo; ann's stays
    ]
    assert [r.status_code for r in refused] == [403, 403, 403, 403, 403, 403, 403, 409]
    assert snapshot(Session) == before
    mine = client.get(f"/api/campaigns/{cid}/answers", headers=auth["bob"]).json()
    assert mine == []
    assert client.get(f"/api/campaigns/{cid}/answers", headers=auth["ann"]).json()[0]["annotator"] == "ann"
    theirs = client.get(f"/api/campaigns/{cid}/answers?annotator=ann", headers=auth["admin"]).json()
    assert len(theirs) == 1
    exported = client.get(f"/api/admin/campaigns/{cid}/export", headers=auth["admin"]).text.splitlines()
    assert len(exported) == 1 and json.loads(exported[0])["annotator"] == "ann"
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


def test_malformed_submissions_are_refused_and_change_nothing(setup):
    client, auth, Session, cid = setup
    view = client.get(f"/api/campaigns/{cid}/next", headers=auth["ann"]).json()
    other = client.get(f"/api/campaigns/{cid}/next", headers=auth["bob"]).json()  # same item, overlap 2
    client.post(f"/api/admin/campaigns", headers=auth["admin"], json={"name": "c2", "items": campaign_items(1)})
    item = view["item"]
    before = snapshot(Session)
    url = f"/api/campaigns/{cid}/answers"
    bodies = [
        {"ranking": [0, 1, 2]},  # no item
        {"item": item, "ranking": [0, 1]},  # a response left out
        {"item": item, "ranking": [0, 0, 1]},  # placed twice
        {"item": item, "ranking": [0, 1, 7]},  # out of range
        {"item": item, "ranking": [-1, 0, 1]},
        {"item": item, "ranking": ["0", "1", "2"]},  # strings
        {"item": item, "ranking": [True, 0, 2]},  # bools are not indices
        {"item": item, "ranking": [[0, 1, 2], 0]},
        {"item": item, "ranking": [0, 1, 2], "strength": 5},
        {"item": item, "ranking": [0, 1, 2], "reason": "x" * 2001},
        {"item": item, "ranking": [0, 1, 2], "admin": True},  # unknown field
        {"item": str(item), "ranking": [0, 1, 2]},
        {"item": 10 ** 9, "ranking": [0, 1, 2]},  # no such item
        {"item": other["item"] + 1, "ranking": [0, 1, 2]},  # not leased to ann
    ]
    codes = [client.post(url, headers=auth["ann"], json=b).status_code for b in bodies]
    codes.append(client.post(url, headers=auth["ann"], content=b"{not json", ).status_code)
    codes.append(client.post(f"/api/campaigns/{cid + 1}/answers", headers=auth["ann"],  # item of another campaign
                             json={"item": item, "ranking": [0, 1, 2]}).status_code)
    codes.append(client.post(f"/api/admin/campaigns", headers=auth["admin"],
                             json={"name": "bad", "items": [{"item_id": "a", "prompt": "p", "responses": ["x"]}]}).status_code)
    codes.append(client.post(f"/api/campaigns/{cid}/skip", headers=auth["ann"], json={"item": "x"}).status_code)
    assert all(400 <= c < 500 for c in codes), codes
    assert snapshot(Session) == before
    # and a good answer still goes through afterwards, exactly once
    ok = client.post(url, headers=auth["ann"], json={"item": item, "ranking": [[0, 2], 1], "strength": 2})
    assert ok.status_code == 201 and ok.json()["ranking"]
    assert client.post(url, headers=auth["ann"], json={"item": item, "ranking": [0, 1, 2]}).status_code == 409


def test_concurrent_answers_on_uvicorn_none_lost_or_duplicated(db_url):  # noqa: F811
    url = db_url
    Session = get_sessionmaker(url)
    with Session() as s:
        tokens = [service.create_annotator(s, f"sim{n}") for n in range(20)]
        cid = service.create_campaign(s, "load", campaign_items(100, k=4), overlap=2).id
    with BackgroundServer(url) as base:
        start = time.time()
        people = run_http_annotators(base, tokens, cid, answers=200, deadline_s=60)
        elapsed = time.time() - start
    assert all(p.error is None for p in people), [p.error for p in people if p.error]
    acknowledged = [a for p in people for a in p.acknowledged]
    with Session() as s:
        stored = s.scalars(select(service.Answer.id)).all()
        per_item = s.execute(select(service.Answer.item_pk, service.Answer.annotator_id)).all()
    assert len(acknowledged) == 200 and sorted(acknowledged) == sorted(stored)  # none lost
    assert len(set(per_item)) == len(per_item)  # nobody answered an item twice
    counts = {}
    for item, _ in per_item:
        counts[item] = counts.get(item, 0) + 1
    assert max(counts.values()) == 2  # never more than the overlap
    assert elapsed < 60
