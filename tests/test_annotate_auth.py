"""Every route, every identity: an auth walk that must refuse and change nothing, and schemathesis
fuzzing from the server's own OpenAPI schema that must never get a 5xx."""

from collections import Counter

import pytest
import schemathesis
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from alignloop.annotate import service
from alignloop.annotate.app import create_app
from alignloop.annotate.db import get_sessionmaker

from test_annotate_http import admin_and_two_annotators, campaign_items, snapshot


@pytest.fixture
def world(tmp_path):
    """An admin, two annotators, a campaign in which ann holds one item and has answered another."""
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    Session = get_sessionmaker(url)
    with Session() as s:
        tokens = admin_and_two_annotators(s)
        cid = service.create_campaign(s, "c", campaign_items(6), overlap=1).id
        ann = service.find_annotator(s, "ann")
        answered = service.next_item(s, ann, cid)["item"]
        service.submit_answer(s, ann, cid, answered, [0, 1, 2])
        held = service.next_item(s, ann, cid)["item"]
    app = create_app(url)
    return app, Session, tokens, cid, held


def api_routes(app) -> set[tuple[str, str]]:
    return {(method, r.path) for r in app.routes if isinstance(r, APIRoute) and r.path.startswith("/api/")
            for method in r.methods}


def walk(cid: int, held: int) -> dict[tuple[str, str], tuple[str, dict | None]]:
    """A well-formed request for every route: refused only for who sends it, never for what it says."""
    return {
        ("GET", "/api/me"): ("/api/me", None),
        ("GET", "/api/campaigns"): ("/api/campaigns", None),
        ("GET", "/api/campaigns/{cid}/next"): (f"/api/campaigns/{cid}/next", None),
        ("POST", "/api/campaigns/{cid}/answers"): (f"/api/campaigns/{cid}/answers", {"item": held, "ranking": [0, 1, 2]}),
        ("POST", "/api/campaigns/{cid}/skip"): (f"/api/campaigns/{cid}/skip", {"item": held}),
        ("POST", "/api/campaigns/{cid}/undo"): (f"/api/campaigns/{cid}/undo", None),
        ("GET", "/api/campaigns/{cid}/answers"): (f"/api/campaigns/{cid}/answers?annotator=ann", None),
        ("POST", "/api/admin/campaigns"): ("/api/admin/campaigns", {"name": "new", "items": campaign_items(2)}),
        ("PATCH", "/api/admin/campaigns/{cid}"): (f"/api/admin/campaigns/{cid}", {"overlap": 3}),
        ("GET", "/api/admin/campaigns/{cid}/stats"): (f"/api/admin/campaigns/{cid}/stats", None),
        ("GET", "/api/admin/campaigns/{cid}/export"): (f"/api/admin/campaigns/{cid}/export?kind=pairs", None),
        ("POST", "/api/admin/annotators"): ("/api/admin/annotators", {"name": "eve", "admin": True}),
    }


# Routes that act on one person's own things: with another person's token they must be refused too.
PERSONAL = {("POST", "/api/campaigns/{cid}/answers"), ("POST", "/api/campaigns/{cid}/skip"),
            ("POST", "/api/campaigns/{cid}/undo"), ("GET", "/api/campaigns/{cid}/answers")}


def test_auth_walk_every_route_refuses_and_changes_nothing(world):
    app, Session, tokens, cid, held = world
    requests = walk(cid, held)
    assert set(requests) == api_routes(app), "a route was added: add it to the walk"
    client = TestClient(app)
    identities = {
        "no token": {}, "empty token": {"Authorization": "Bearer "}, "not bearer": {"Authorization": "Basic YWRtaW4="},
        "bad token": {"Authorization": "Bearer " + "x" * 32},
        "admin token with a byte changed": {"Authorization": "Bearer " + tokens["admin"][:-1] + "?"},
        "overlong token": {"Authorization": "Bearer " + tokens["admin"] * 20},
    }
    before = snapshot(Session)
    refused = Counter()
    for (method, route), (path, body) in requests.items():
        for name, headers in identities.items():  # nobody signed in: 401 everywhere
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (name, method, route, r.status_code)
            refused[r.status_code] += 1
        bearer = {"Authorization": f"Bearer {tokens['bob']}"}
        if route.startswith("/api/admin/"):  # an annotator on admin routes: 403
            r = client.request(method, path, json=body, headers=bearer)
            assert r.status_code == 403, (method, route, r.status_code)
            refused[r.status_code] += 1
        elif (method, route) in PERSONAL:  # bob with ann's item, ann's answers, undo of nothing of his
            r = client.request(method, path, json=body, headers=bearer)
            assert r.status_code in (403, 409), (method, route, r.status_code)
            refused[r.status_code] += 1
    assert snapshot(Session) == before  # every table unchanged
    assert sum(refused.values()) == 12 * 6 + 5 + 4 == 81


def fuzz_strategies(schema, cid: int):
    """For every operation: schema-valid and schema-violating cases, half of them on the real campaign."""
    for result in schema.get_all_operations():
        op = result.ok()
        has_cid = "{cid}" in op.path
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            options = [op.as_strategy(generation_mode=mode)]
            if has_cid:
                options.append(op.as_strategy(generation_mode=mode, path_parameters={"cid": cid}))
            yield f"{op.method.upper()} {op.path} {mode.value}", st.one_of(options)


EXAMPLES_PER_STRATEGY = 25  # x 24 strategies x 3 identities = 1,800 requests, about 30 s here


def test_schemathesis_every_route_with_and_without_tokens_never_5xx(world):
    app, Session, tokens, cid, held = world
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    identities = {"generated": None, "annotator": tokens["ann"], "admin": tokens["admin"]}
    statuses: Counter = Counter()
    failures = []

    for name, strategy in fuzz_strategies(schema, cid):
        @settings(max_examples=EXAMPLES_PER_STRATEGY, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            for who, token in identities.items():
                headers = None if token is None else {"Authorization": f"Bearer {token}"}
                response = case.call(headers=headers)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append((name, who, response.status_code, case.as_curl_command()[:300]))

        run()
    total = sum(statuses.values())
    print(f"schemathesis: {total} requests, statuses {dict(sorted(statuses.items()))}")
    assert failures == []
    assert total >= 24 * 3 * 5  # hypothesis may stop early on small input spaces, never at nothing
    assert statuses[401] and statuses[403] and statuses[422] and (statuses[200] or statuses[201])
