"""The annotation service: exact overlap, skips, undo, round trips, simulated rounds, exports.

Every test here runs on SQLite and on PostgreSQL. PostgreSQL needs ALIGNLOOP_TEST_PG_URL, a URL
of a server where this user may create databases (`make test` and .ci/run start one and set it);
each test gets a fresh database there. Without it those runs skip, except in CI, where they fail.
"""

import json
import os
import time
import uuid

import pytest
from sqlalchemy import create_engine, make_url, select, update

from alignloop.annotate import campaign_progress, service
from alignloop.annotate.db import Annotator, Answer, Lease, get_engine, get_sessionmaker, write_transaction
from alignloop.annotate.export import ranking_rows, write_exports
from alignloop.annotate.simulate import run_simulated_annotation
from alignloop.errors import InputError


def write_campaign(path, n, k=3, tag="r"):
    # Response j of item i has length j + 1 words: a length label function knows the true order.
    rows = [{"item_id": f"{tag}{i}", "prompt": f"prompt {i} <b>", "responses": [" ".join(["w"] * (j + 1)) + f" {i}"
                                                                             for j in range(k)], "meta": {"k": k}}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PG_ENV = "ALIGNLOOP_TEST_PG_URL"


def fresh_postgres_database():
    """(url of a new empty database, a function that drops it) on the server named by ALIGNLOOP_TEST_PG_URL."""
    base = os.environ.get(PG_ENV)
    if not base:
        reason = f"PostgreSQL runs need {PG_ENV} (make test starts a server and sets it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run them")
        pytest.skip(reason)
    name = f"alignloop_test_{uuid.uuid4().hex[:12]}"
    server = create_engine(base, isolation_level="AUTOCOMMIT")
    with server.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(base).set(database=name).render_as_string(hide_password=False)

    def drop():
        get_engine(url).dispose()
        with server.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        server.dispose()

    return url, drop


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty annotation database: SQLite in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'a.db'}"
        return
    url, drop = fresh_postgres_database()
    yield url
    drop()


@pytest.fixture
def db(db_url, tmp_path):
    url = db_url
    Session = get_sessionmaker(url)
    with Session() as s:
        names = ["ann", "bob", "cat"]
        for n in names:
            service.create_annotator(s, n)
        people = {n: s.scalar(select(Annotator).where(Annotator.name == n)) for n in names}
        items = service.read_campaign_file(write_campaign(tmp_path / "c.jsonl", 3))
        campaign = service.create_campaign(s, "c", items, overlap=2)
    return url, Session, people, campaign.id


def test_overlap_is_exact_with_leases_and_expiry(db):
    url, Session, p, cid = db
    with Session() as s:
        first = service.next_item(s, p["ann"], cid)["item"]
        assert service.next_item(s, p["bob"], cid)["item"] == first  # two slots on the first item
        assert service.next_item(s, p["cat"], cid)["item"] != first  # both slots leased: cat gets another
        assert service.next_item(s, p["ann"], cid)["item"] == first  # asking again returns the held item
        # bob's lease runs out: the slot returns to the pool, and bob's answer is refused if it was taken.
        with write_transaction(s):
            s.execute(update(Lease).where(Lease.annotator_id == p["bob"].id).values(expires=time.time() - 1))
        service.submit_answer(s, p["cat"], cid, service.next_item(s, p["cat"], cid)["item"], [0, 1, 2])
        assert service.next_item(s, p["cat"], cid)["item"] == first
        with pytest.raises(service.Refused) as e:
            service.submit_answer(s, p["bob"], cid, first, [0, 1, 2])
        assert e.value.status == 409
        service.submit_answer(s, p["ann"], cid, first, [0, 1, 2])
        service.submit_answer(s, p["cat"], cid, first, [0, 1, 2])
        assert s.scalar(select(Answer).where(Answer.item_pk == first, Answer.annotator_id == p["bob"].id)) is None
        with pytest.raises(service.Refused):  # never the same item twice to one person
            service.submit_answer(s, p["ann"], cid, first, [0, 1, 2])
        assert service.next_item(s, p["ann"], cid)["item"] != first
    assert campaign_progress(url, cid) == (3, 6)


def test_skip_undo_and_overlap_change(db):
    url, Session, p, cid = db
    with Session() as s:
        item = service.next_item(s, p["ann"], cid)["item"]
        service.skip_item(s, p["ann"], cid, item)
        assert service.next_item(s, p["ann"], cid)["item"] != item  # a skipped item never comes back
        second = service.next_item(s, p["ann"], cid)["item"]
        service.submit_answer(s, p["ann"], cid, second, [[0, 1], 2], strength=3, reason="tie at top")
        undone = service.undo_last(s, p["ann"], cid)
        assert undone["item"] == second and service.answers_of(s, p["ann"], cid) == []
        assert service.next_item(s, p["ann"], cid)["item"] == second  # the undone item comes straight back
        service.submit_answer(s, p["ann"], cid, second, [2, 1, 0])
        assert [a["item"] for a in service.answers_of(s, p["ann"], cid)] == [second]
        service.set_overlap(s, cid, 1)  # lowering N mid-campaign closes the answered item to others
        assert service.next_item(s, p["bob"], cid)["item"] == item  # ann's skip left item 1 open to others
        assert service.progress(s, p["ann"], cid) == {"done": 1, "left": 1}  # only item 3 remains for ann


def test_answers_round_trip_through_the_shuffled_order(db, tmp_path):
    """Saved ranking == what was chosen on screen, mapped back through the order shown."""
    url, Session, p, cid = db
    with Session() as s:
        seen_orders = set()
        for who in ("ann", "bob"):
            while (view := service.next_item(s, p[who], cid)) is not None:
                by_length = sorted(range(3), key=lambda pos: -len(view["responses"][pos]))  # longest first
                r = service.submit_answer(s, p[who], cid, view["item"], [by_length[0], by_length[1:]], all_bad=False)
                item = s.get(service.Item, view["item"])
                # whatever the shuffle, the longest response (index 2) is best and 0, 1 tie
                assert r["ranking"] == [2, [0, 1]]
                order = service.shown_order(p[who].id, item)
                assert [item.responses[i] for i in order] == view["responses"]
                seen_orders.add(tuple(order))
        assert len(seen_orders) > 1  # the order really is shuffled
        rows = ranking_rows(s, [cid])
    assert len(rows) == 6 and all(r["ranking"] == [2, [0, 1]] for r in rows)
    assert {r["annotator"] for r in rows} == {"ann", "bob"}


def test_all_bad_and_malformed_answers(db):
    url, Session, p, cid = db
    with Session() as s:
        item = service.next_item(s, p["ann"], cid)["item"]
        for bad in ([0, 1], [0, 0, 1], [0, 1, 3], [[0, 1, 2], 0], [], "012", [True, 0, 1], [[], 0, 1, 2]):
            with pytest.raises(service.Refused) as e:
                service.submit_answer(s, p["ann"], cid, item, bad)
            assert e.value.status == 422
        with pytest.raises(service.Refused):
            service.submit_answer(s, p["ann"], cid, item, [0, 1, 2], strength=4)
        assert s.scalar(select(Answer)) is None
        r = service.submit_answer(s, p["ann"], cid, item, [], all_bad=True)
        assert r["ranking"] == [[0, 1, 2]]


def test_campaign_file_errors_name_line_and_field(tmp_path, db):
    url, Session, p, cid = db
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "prompt": "p", "responses": ["x", "y"]}\n'
                   '{"item_id": "b", "prompt": "p", "responses": ["x"]}\n')
    with Session() as s, pytest.raises(InputError, match=r"bad.jsonl:2: field 'responses'"):
        service.create_campaign(s, "bad", service.read_campaign_file(bad), source=str(bad))
    bad.write_text('{"item_id": "a", "prompt": 3, "responses": ["x", "y"]}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: field 'prompt': expected str"):
        service.read_campaign_file(bad)


def test_simulated_rounds_and_exports(tmp_path, db_url):
    lf = tmp_path / "lf.py"
    lf.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    spec = f"{lf}:length"
    out = tmp_path / "out"
    first = run_simulated_annotation(write_campaign(tmp_path / "r1.jsonl", 8, k=4, tag="a"), out, spec,
                                     annotators=3, overlap=2, noise=0.0, seed=1, db_url=db_url)
    assert (first["items"], first["answers"], first["new_answers"]) == (8, 16, 16)
    assert first["agreement"]["pairwise"] == 1.0  # noise 0 and a deterministic label function
    rows = [json.loads(line) for line in open(first["rankings"])]
    assert all(r["ranking"] == [3, 2, 1, 0] for r in rows)  # longest first, in original indices
    pairs = [json.loads(line) for line in open(first["preferences"])]
    assert len(pairs) == 16 * 6 and all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)

    again = run_simulated_annotation(tmp_path / "r1.jsonl", out, spec, annotators=3, overlap=2, noise=0.0,
                                     db_url=db_url)
    assert again["campaign"] == first["campaign"] and again["new_answers"] == 0  # same file: resumed, nothing new

    second = run_simulated_annotation(write_campaign(tmp_path / "r2.jsonl", 5, k=2, tag="b"), out, spec,
                                      annotators=3, overlap=1, noise=0.5, mode="pairwise", seed=2, db_url=db_url)
    assert second["campaign"] != first["campaign"] and second["answers"] == 5
    assert sum(1 for _ in open(second["rankings"])) == 5  # this round only
    assert sum(1 for _ in open(second["all_rankings"])) == 21  # every round so far

    with get_sessionmaker(second["db"])() as s:
        summary = write_exports(ranking_rows(s), tmp_path / "exp", dataset=True)
    import datasets

    ds = datasets.load_from_disk(summary["dataset"])
    assert ds.num_rows == summary["pairs"] == second["all_pairs"]
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)


def test_campaign_name_and_open_campaign_resume_by_file_contents(db, tmp_path):
    """The pipeline's entry points: same file contents -> same campaign; another round's file -> a new one."""
    url, Session, p, cid = db
    first = write_campaign(tmp_path / "round.jsonl", 4, tag="a")
    (tmp_path / "copy").mkdir()
    same = tmp_path / "copy" / "round.jsonl"
    same.write_bytes(first.read_bytes())
    assert service.campaign_name(first) == service.campaign_name(same)
    assert service.campaign_name(first).startswith("round-")
    with Session() as s:
        opened = service.open_campaign(s, first, "rank", 2)
        again = service.open_campaign(s, same, "pairwise", 1)  # found by name: made as it was the first time
        assert (again.id, again.mode, again.overlap) == (opened.id, "rank", 2)
        assert [c["items"] for c in service.list_campaigns(s) if c["id"] == opened.id] == [4]
        second = service.open_campaign(s, write_campaign(tmp_path / "round.jsonl", 5, tag="b"), "rank", 1)
        assert second.id != opened.id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "prompt": "p", "responses": ["x", "\\ud800"]}\n')
    with Session() as s, pytest.raises(InputError, match=r"bad.jsonl:1: field 'responses'"):
        service.open_campaign(s, bad, "rank", 1)


def test_model_output_with_nul_is_kept_exactly(db, tmp_path):
    """Sampled responses may hold NUL (a tiny model emits any byte): stored and exported as they were.
    NUL stays refused where a database cannot keep it (prompts and names are text columns)."""
    url, Session, p, cid = db
    odd = ["a\x00b", "plain", "\x00"]
    with Session() as s:
        nul = service.create_campaign(s, "nul", [{"item_id": "n", "prompt": "say", "responses": odd,
                                                  "meta": {"k\x00": "v\x00"}}])
        view = service.next_item(s, p["ann"], nul.id)
        service.submit_answer(s, p["ann"], nul.id, view["item"], [0, 1, 2])
        rows = ranking_rows(s, [nul.id])
        with pytest.raises(InputError, match="field 'prompt': must not contain NUL"):
            service.create_campaign(s, "nul2", [{"item_id": "n", "prompt": "a\x00", "responses": ["x", "y"]}])
    assert rows[0]["responses"] == odd


@pytest.mark.parametrize("options, message", [
    (["--noise", "nan"], "--noise: expected a finite number, got nan"),
    (["--noise", "1.5"], "--noise: noise is a share of answers, in [0, 1]"),
    (["--annotators", "0"], "--annotators: annotators must be >= 1"),
    (["--overlap", "0"], "--overlap: overlap must be >= 1"),
    (["--overlap", "4"], "--overlap: overlap (4) cannot exceed annotators (3)"),
])
def test_the_simulate_command_checks_its_values_as_the_pipeline_does(tmp_path, options, message):
    """Zero annotators or a NaN noise used to 'succeed' with no answers or random ones: refused in one line."""
    import subprocess
    import sys

    campaign, out = write_campaign(tmp_path / "c.jsonl", 2), tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "alignloop", "annotate", "simulate", str(campaign), str(out),
                           "--label-function", "vader", *options], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr
    assert not (out / "annotations.db").exists()


@pytest.mark.parametrize("url, message", [
    ("bogus://x", "bogus://x: not a database URL this install can use"),
    ("postgresql+psycopg://u:secret@127.0.0.1:1/x", "postgresql+psycopg://u:***@127.0.0.1:1/x: cannot open the database"),
    ("sqlite:////proc/no/x.db", "sqlite:////proc/no/x.db: cannot create the database file"),
])
def test_a_database_url_that_cannot_be_used_is_one_error_naming_it_without_its_password(url, message):
    with pytest.raises(InputError) as e:
        get_engine(url)
    assert str(e.value).startswith(message) and "secret" not in str(e.value)


def test_exporting_a_database_with_no_answers_writes_empty_files_and_an_empty_dataset(tmp_path):
    import datasets

    with get_sessionmaker(f"sqlite:///{tmp_path / 'a.db'}")() as s:
        summary = write_exports(ranking_rows(s), tmp_path / "out", dataset=True)
    assert summary["ranking_rows"] == summary["pairs"] == 0
    assert (tmp_path / "out" / "rankings.jsonl").read_text() == (tmp_path / "out" / "preferences.jsonl").read_text() == ""
    ds = datasets.load_from_disk(summary["dataset"])
    assert ds.num_rows == 0 and {"prompt", "chosen", "rejected"} <= set(ds.column_names)


def test_a_port_out_of_range_is_refused_before_serving(tmp_path):
    from alignloop.annotate.app import BackgroundServer, serve
    from alignloop.annotate.stage import AnnotateConfig
    from alignloop.errors import ConfigError

    db = f"sqlite:///{tmp_path / 'a.db'}"
    for port in (-1, 65536):
        with pytest.raises(ConfigError, match="port must be in 0-65535"):
            serve(db, port=port)
        with pytest.raises(ConfigError, match="port must be in 0-65535"):
            BackgroundServer(db, port=port)
        with pytest.raises(ConfigError, match=r"AnnotateConfig.port: at (least 0|most 65,535) is allowed"):
            AnnotateConfig(campaign=tmp_path / "c.jsonl", human=True, port=port)
