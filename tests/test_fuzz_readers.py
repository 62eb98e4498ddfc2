"""Fuzzing every data reader: whatever bytes a file holds, the reader returns rows or raises one InputError line.

The property is the same for each reader: no other exception escapes, the message is one line that
starts with the file's path, and a problem inside the file names its line. The inputs mix rows a
reader accepts with random bytes, non-UTF-8, truncated lines, wrong types, missing fields, NaN and
infinities, integers past what Python converts, deep nesting, huge strings and lone surrogates.

Examples are derandomized (the same ones on every run, so CI never flakes) and bounded:
FUZZ_EXAMPLES per reader, 60 unless ALIGNLOOP_FUZZ_EXAMPLES says otherwise (a longer local hunt:
ALIGNLOOP_FUZZ_EXAMPLES=2000).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.annotate import service
from alignloop.annotate.db import get_sessionmaker
from alignloop.corpus import load_corpus
from alignloop.errors import InputError
from alignloop.gguf_import import import_gguf
from alignloop.realdata import INNER_ARCHIVE, parse_ratings_file, parse_text_file, read_chatterbot_file, read_human_ratings
from alignloop.reward.data import read_preferences
from alignloop.sampling import read_prompts
from alignloop.sft import read_pairs

FUZZ_EXAMPLES = int(os.environ.get("ALIGNLOOP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Messages about the file as a whole, which have no line to name.
WHOLE_FILE_PROBLEMS = ("no non-empty prompts", "no prompt/response pairs", "the corpus is empty", "no items")

FIELDS = ["prompt", "response", "completion", "chosen", "rejected", "responses", "ranking", "margin", "text",
          "item_id", "meta", "gold", "annotator", "role", "content", "majority_vote_share", "domain"]

texts = st.one_of(st.text(max_size=30), st.sampled_from(["", "   ", "x" * 200_000, "caf\u00e9 \U0001f600", "a\x00b"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10 ** 40), max_value=10 ** 40),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), kids, max_size=4),
                      max_leaves=10)
random_rows = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=6)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": texts}),
                    max_size=3)
rankings = st.lists(st.integers(-1, 4) | st.lists(st.integers(-1, 4), max_size=3), max_size=5)
# Rows each reader accepts (or rejects with a reason), so the success path runs too.
good_rows = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "response": texts}),
    st.fixed_dictionaries({"prompt": texts, "chosen": texts | messages, "rejected": texts | messages},
                          optional={"margin": st.floats(allow_nan=True, allow_infinity=True) | st.integers()}),
    st.fixed_dictionaries({"chosen": messages, "rejected": messages}),
    st.fixed_dictionaries({"prompt": texts, "responses": st.lists(texts, max_size=4), "ranking": rankings}),
    st.fixed_dictionaries({"item_id": st.text(max_size=6), "prompt": texts, "responses": st.lists(texts, max_size=4)},
                          optional={"gold": rankings, "meta": values}),
    st.fixed_dictionaries({"text": texts}),
)
# Lines no generated row produces: what hand-edited and half-copied files hold.
ODD_LINES = [
    b'{"prompt": 1' + b"0" * 5000 + b"}",  # past Python's 4,300-digit int conversion
    b"[" * 5000,  # deeper than the JSON decoder recurses
    b'{"prompt": "\\ud800 lone surrogate", "response": "x"}',
    b'\xef\xbb\xbf{"prompt": "after a BOM", "response": "x"}',
    b'{"prompt": NaN, "margin": Infinity}',
    b'{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1e999}',
    b'{"prompt": "caf\xe9", "response": "latin-1"}',
    b'"just a string"',
    b"null",
    b'{"prompt": "a", "responses": ["b", "c"], "ranking": [[0, 1]]}',
    b'{"prompt": "a", "text": "b", "response": "c", "chosen": "d", "rejected": "e", "item_id": "i", "responses": ["f", "g"]}',
]


def encode(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


lines = st.one_of(
    (good_rows | random_rows).map(encode),
    (good_rows | random_rows).map(encode).flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),
    st.binary(max_size=40),
    st.sampled_from(ODD_LINES),
)
jsonl_files = st.lists(lines, max_size=6).map(lambda ls: b"\n".join(ls))


def assert_reads_or_one_line_error(path: Path, read: Callable[[Path], Any], line_level: bool = True) -> Any:
    """`read(path)`'s result, or None after checking its InputError: one line, the path first, a line if it can."""
    try:
        return read(path)
    except InputError as e:
        message = str(e)
        assert "\n" not in message, message
        assert message.startswith(str(path)), message
        if line_level and not any(p in message for p in WHOLE_FILE_PROBLEMS):
            assert e.line is not None, message
        return None


def fuzz_file(content: bytes, read: Callable[[Path], Any], name: str = "data.jsonl", line_level: bool = True) -> Any:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(content)
        return assert_reads_or_one_line_error(path, read, line_level)


@FUZZ
@given(jsonl_files)
def test_fuzz_prompts(content):
    prompts = fuzz_file(content, read_prompts)
    if prompts is not None:
        assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)


@FUZZ
@given(jsonl_files)
def test_fuzz_sft_pairs(content):
    pairs = fuzz_file(content, read_pairs)
    if pairs is not None:
        assert all(isinstance(p["prompt"], str) and p["response"].strip() for p in pairs)


@FUZZ
@given(jsonl_files)
def test_fuzz_preference_pairs_and_rankings(content):
    data = fuzz_file(content, read_preferences)
    if data is not None:
        assert data.rows == len(data.items) + sum(data.rejected.values())  # every row used or counted
        for p in data.items:
            assert len(p.responses) >= 2 and len(p.ranks) == len(p.responses) and p.comparisons()
            assert p.margin is None or abs(p.margin) < float("inf")


@FUZZ
@given(jsonl_files)
def test_fuzz_jsonl_corpus(content):
    docs = fuzz_file(content, load_corpus)
    if docs is not None:
        assert docs and all(isinstance(d, str) and d for d in docs)


@FUZZ
@given(st.lists(st.binary(max_size=30) | texts.map(lambda t: t.encode("utf-8", errors="surrogatepass"))
                | st.sampled_from([b"%", b"", b"\xff\xfe", b"caf\xe9"]), max_size=8).map(lambda ls: b"\n".join(ls)))
def test_fuzz_text_corpus(content):
    docs = fuzz_file(content, load_corpus, name="corpus.txt")
    if docs is not None:
        assert docs and all(isinstance(d, str) and d for d in docs)


CAMPAIGN_NUMBERS = itertools.count()  # each import needs a fresh campaign name


@pytest.fixture(scope="module")
def campaign_db():
    with tempfile.TemporaryDirectory() as d:
        yield get_sessionmaker(f"sqlite:///{Path(d) / 'fuzz.db'}")


def read_and_import_campaign(session_factory, path: Path) -> int:
    """What `alignloop annotate create-campaign` does: read the file, then import it (checked row by row)."""
    items = service.read_campaign_file(path)
    with session_factory() as s:
        try:
            service.create_campaign(s, f"c{next(CAMPAIGN_NUMBERS)}", items, source=str(path))
        except InputError:
            s.rollback()  # the service raises mid-transaction; a real caller discards the session too
            raise
    return len(items)


@FUZZ
@given(content=jsonl_files)
def test_fuzz_campaign_file(campaign_db, content):
    fuzz_file(content, lambda path: read_and_import_campaign(campaign_db, path))


ratings_lines = st.one_of(
    st.tuples(st.text(max_size=5), st.floats(allow_nan=True) | st.integers(-5, 5), st.floats(0, 3),
              st.lists(st.integers(-6, 6), max_size=4)).map(lambda t: f"{t[0]}\t{t[1]}\t{t[2]}\t{t[3]}".encode()),
    st.sampled_from([b"1\t0.5\t0.1\t[1, 0]", b"1\t0.5\t0.1\t{[]: 1}", b"1\tnan\t0\t[0]", b"2\t0\t0\t" + b"[" * 3000,
                     b"3\t0\t0\t[" + b"9" * 5000 + b"]", b"4\t1e999\t0\t[1]", b"caf\xe9\t0\t0\t[0]"]),
    st.binary(max_size=30),
)
text_lines = st.one_of(
    st.tuples(st.text(max_size=5), st.floats(allow_nan=True), texts).map(lambda t: f"{t[0]}\t{t[1]}\t{t[2]}".encode(
        "utf-8", errors="surrogatepass")),
    st.binary(max_size=30),
)


@FUZZ
@given(st.lists(ratings_lines, max_size=5).map(lambda ls: b"\n".join(ls)),
       st.lists(text_lines, max_size=5).map(lambda ls: b"\n".join(ls)))
def test_fuzz_human_ratings_files(ratings, text):
    for parse, data in ((parse_ratings_file, ratings), (parse_text_file, text)):
        assert_reads_or_one_line_error(Path("tweets.txt"), lambda where: parse(data, str(where)))


def tar_bytes(members: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


archives = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda inner: tar_bytes({f"vaderSentiment-3.3.2/{INNER_ARCHIVE}": inner}, gz=True)),
    st.tuples(st.binary(max_size=60), st.integers(0, 400)).map(  # a real inner archive cut short
        lambda t: tar_bytes({f"vaderSentiment-3.3.2/{INNER_ARCHIVE}": tar_bytes(
            {"tweets_anonDataRatings.txt": t[0], "tweets_GroundTruth.txt": t[0]}, gz=True)[: t[1]]})),
    st.binary(max_size=60).map(lambda data: tar_bytes({"tweets_anonDataRatings.txt": data})),
)


@FUZZ
@given(archives)
def test_fuzz_ratings_archive(content):
    # A damaged archive is one error about the archive; a line number only where a member's line is at fault.
    fuzz_file(content, read_human_ratings, name="ratings.tar.gz", line_level=False)


yaml_docs = st.one_of(
    st.binary(max_size=60),
    st.fixed_dictionaries({"categories": values, "conversations": values}).map(
        lambda d: json.dumps(d).encode()),  # JSON is YAML
    st.lists(st.lists(texts, max_size=3), max_size=3).map(
        lambda convs: json.dumps({"categories": ["c"], "conversations": convs}).encode()),
    st.sampled_from([b"conversations: [[a, b]]\ncategories: 7\n", b"conversations:\n- - hi\n  - caf\xe9\n",
                     b"conversations: " + b"[" * 3000, b"!!python/object:os.system {}"]),
)


@FUZZ
@given(yaml_docs)
def test_fuzz_chatterbot_file(content):
    rows = fuzz_file(content, read_chatterbot_file, name="greetings.yml", line_level=False)
    if rows is not None:
        assert all(isinstance(r["prompt"], str) and r["prompt"] and r["response"] for r in rows)


gguf_files = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.integers(0, 4), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), st.binary(max_size=300)).map(
        lambda t: b"GGUF" + struct.pack("<IQQ", *t[:3]) + t[3]),  # a header whose counts and sizes are noise
)


@FUZZ
@given(gguf_files)
def test_fuzz_gguf_file(content):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        fuzz_file(content, lambda path: import_gguf(path, out), name="m.gguf", line_level=False)
        assert not out.exists()  # nothing written for a file that did not load
