"""Load test of the annotation app on loopback: N concurrent simulated people submit M answers over HTTP.

The server is a real `alignloop annotate serve` (uvicorn; SQLite WAL by default, or any
database URL given with --db) in its own process on 127.0.0.1; the people are threads here,
each with its own HTTP connection, answering with a random ranking (ties now and then).
Afterwards the database is checked: every acknowledged answer is stored, none twice, no item
over its overlap (only this run's campaign is counted, so --db may hold other data).

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/annotate_load.py \
        --answers 2000 --annotators 20 --out runs/annotate_load
    scripts/with-postgres.sh sh -c '.venv/bin/python benchmarks/annotate_load.py --db "$ALIGNLOOP_TEST_PG_URL" ...'

Figures come from whatever machine runs it (ours: a shared 2-core CPU); they include the
client threads' own time, so they understate what the server alone could do.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import select

from alignloop.annotate import service
from alignloop.annotate.db import Answer, get_sessionmaker
from alignloop.annotate.simulate import run_http_annotators


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=2000)
    ap.add_argument("--annotators", type=int, default=20)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="responses per item")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds before the people stop, done or not")
    ap.add_argument("--out", type=Path, default=Path("runs/annotate_load"))
    ap.add_argument("--db", help="database URL (default: a fresh SQLite file in --out)")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    if args.db:
        url = args.db
    else:
        db = args.out / "load.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{db}"
    run = time.strftime("%Y%m%d-%H%M%S")  # names of this run's campaign and people: --db may be reused
    items = [{"item_id": f"i{i}", "prompt": f"Prompt {i}: say something about the sea.",
              "responses": [f"Response {j} to prompt {i}. " * 8 for j in range(args.k)], "meta": {}}
             for i in range(-(-args.answers // args.overlap))]
    with get_sessionmaker(url)() as s:
        tokens = [service.create_annotator(s, f"load{n}-{run}") for n in range(args.annotators)]
        cid = service.create_campaign(s, f"load-{run}", items, overlap=args.overlap).id

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "alignloop", "annotate", "serve", "--db", url,
                               "--host", "127.0.0.1", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/api/me", timeout=1).status_code == 401:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("server did not start")
        start = time.perf_counter()
        people = run_http_annotators(base, tokens, cid, args.answers, deadline_s=args.deadline)
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)

    errors = [repr(p.error) for p in people if p.error]
    acknowledged = sorted(a for p in people for a in p.acknowledged)
    latencies = [x for p in people for x in p.latencies]
    with get_sessionmaker(url)() as s:
        stored = sorted(s.scalars(select(Answer.id).where(Answer.campaign_id == cid)))
        pairs = s.execute(select(Answer.item_pk, Answer.annotator_id).where(Answer.campaign_id == cid)).all()
    per_item: dict[int, int] = {}
    for item, _who in pairs:
        per_item[item] = per_item.get(item, 0) + 1
    most = max(per_item.values(), default=0)
    result = {
        "database": url.split(":", 1)[0], "annotators": args.annotators, "answers_requested": args.answers, "overlap": args.overlap, "k": args.k,
        "acknowledged": len(acknowledged), "stored": len(stored),
        "lost": len(set(acknowledged) - set(stored)), "unacknowledged_stored": len(set(stored) - set(acknowledged)),
        "duplicates": len(pairs) - len(set(pairs)), "max_answers_per_item": most, "errors": errors,
        "seconds": round(wall, 2), "answers_per_second": round(len(acknowledged) / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1), "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "note": "POST latency of one answer seen by the client; server and 20 client threads share one machine",
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = (not errors and result["lost"] == 0 and result["duplicates"] == 0 and len(acknowledged) == args.answers
          and result["unacknowledged_stored"] == 0 and most <= args.overlap)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
