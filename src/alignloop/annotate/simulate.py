"""Simulated annotators: a label function plus noise, answering through the same service as people.

`run_simulated_annotation` is what the unattended loop calls: in-process, via
`service` (the functions behind the HTTP routes). `HttpAnnotator` does the same
over HTTP, for the load test and for driving a running server.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from sqlalchemy import select

from ..labelers import load_label_function, noisy_preference, noisy_ranking
from . import service
from .db import Annotator, Answer, Item, get_sessionmaker
from .export import ranking_rows, write_exports

Answerer = Callable[[str, Sequence[str], random.Random], list]


def label_answerer(label_function: str = "vader", noise: float = 0.1, mode: str = "rank") -> Answerer:
    """(prompt, shown responses, rng) -> a ranking over shown positions, best first.

    Equal true scores form a tie group (people tie texts they cannot tell apart);
    pairwise campaigns use `noisy_preference`, rank-K `noisy_ranking`.
    """
    score = load_label_function(label_function)

    def answer(prompt: str, responses: Sequence[str], rng: random.Random) -> list:
        scores = score([prompt] * len(responses), list(responses))
        if mode == "pairwise" and len(responses) == 2:
            verdict = noisy_preference(scores[0], scores[1], rng, noise)
            return [[0, 1]] if verdict == -1 else [verdict, 1 - verdict]
        order = noisy_ranking(scores, rng, noise)
        ranking: list[list[int]] = []
        for i in order:
            if ranking and scores[ranking[-1][-1]] == scores[i]:
                ranking[-1].append(i)
            else:
                ranking.append([i])
        return [g[0] if len(g) == 1 else sorted(g) for g in ranking]

    return answer


def run_simulated_annotation(campaign: Path, out_dir: Path, label_function: str = "vader", annotators: int = 3,
                             overlap: int = 1, noise: float = 0.1, mode: str = "rank", seed: int = 0,
                             db_url: str | None = None) -> dict:
    """Import `campaign` (or resume it), let simulated people answer every item, export; returns a summary.

    Writes `out_dir/rankings.jsonl` and `out_dir/preferences.jsonl` for this campaign, and
    `all_rankings.jsonl` / `all_preferences.jsonl` for every campaign in the database so far.
    Each answer is committed on its own, so a killed run loses at most the one in flight, and a rerun
    continues where it stopped with the same answers an unbroken run gives (`resume_position`).
    """
    start = time.time()
    campaign, out_dir = Path(campaign), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite:///{out_dir / 'annotations.db'}"
    Session = get_sessionmaker(db_url)
    answer = label_answerer(label_function, noise, mode)
    with Session() as s:
        camp = service.open_campaign(s, campaign, mode, overlap)
        name = camp.name
        people = []
        for n in range(annotators):
            who = f"sim-{n}"
            if s.scalar(select(Annotator).where(Annotator.name == who)) is None:
                service.create_annotator(s, who)  # the token is not needed in-process
            people.append(s.scalar(select(Annotator).where(Annotator.name == who)))
        campaign_id = camp.id
        rngs = [random.Random(f"{seed}:{p.name}:{campaign_id}") for p in people]
        turn = resume_position(s, campaign_id, people, rngs, answer)

    active = set(range(len(people)))
    answers = 0
    while active:  # round-robin, so the overlap is spread over people as it would be with a crowd
        n = turn % len(people)
        turn += 1
        if n not in active:
            continue
        with Session() as s:
            view = service.next_item(s, people[n], campaign_id)
            if view is None:
                active.discard(n)
                continue
            ranking = answer(view["prompt"], view["responses"], rngs[n])
            service.submit_answer(s, people[n], campaign_id, view["item"], ranking)
            answers += 1

    with Session() as s:
        stats = service.campaign_stats(s, campaign_id)
        this = write_exports(ranking_rows(s, [campaign_id]), out_dir)
        every = write_exports(ranking_rows(s), out_dir, prefix="all_")
    return {
        "stage": "annotate", "campaign": campaign_id, "campaign_name": name, "db": db_url,
        "items": stats["items"], "answers": stats["answers"], "new_answers": answers, "pairs": this["pairs"],
        "agreement": stats["agreement"], "position_bias": stats["position_bias"],
        "rankings": this["rankings"], "preferences": this["preferences"],
        "all_rankings": every["rankings"], "all_preferences": every["preferences"], "all_pairs": every["pairs"],
        "seconds": round(time.time() - start, 2),
    }


def resume_position(s, campaign_id: int, people: list[Annotator], rngs: list[random.Random], answer: Answerer) -> int:
    """Where the round-robin of `people` over `campaign_id` stands after the answers already stored: each
    person's generator is advanced past their answers (replayed in order), and the turn is the person
    after the last one who answered (0 on a fresh campaign). A run killed mid-campaign then continues
    exactly as an unbroken run would have, answer for answer."""
    index = {p.id: n for n, p in enumerate(people)}
    last = None
    rows = s.execute(select(Answer.annotator_id, Answer.shown_order, Item.prompt, Item.responses)
                     .join(Item, Answer.item_pk == Item.id)
                     .where(Answer.campaign_id == campaign_id, Answer.annotator_id.in_(list(index)))
                     .order_by(Answer.id))
    for annotator_id, shown_order, prompt, responses in rows:
        n = index[annotator_id]
        answer(prompt, [responses[i] for i in shown_order], rngs[n])  # draws what the stored answer drew
        last = n
    return 0 if last is None else last + 1


class HttpAnnotator:
    """One simulated person over HTTP: ask for the next item, answer it, repeat; records latencies."""

    def __init__(self, base_url: str, token: str, campaign_id: int, answer: Answerer, seed: int = 0,
                 timeout: float = 30.0):
        import httpx

        self.client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        self.campaign_id, self.answer, self.rng = campaign_id, answer, random.Random(seed)
        self.acknowledged: list[int] = []  # answer ids the server confirmed
        self.latencies: list[float] = []  # seconds per POST of an answer
        self.error: Exception | None = None

    def run(self, budget: "Budget") -> None:
        try:
            self._loop(budget)
        except Exception as e:  # reported by the caller; one failing person must not hide the others' results
            self.error = e
        finally:
            self.client.close()

    def _loop(self, budget: "Budget") -> None:
        base = f"/api/campaigns/{self.campaign_id}"
        while budget.left_to_take():
            r = self.client.get(f"{base}/next")
            r.raise_for_status()
            view = r.json()
            if view is None:
                return
            # Taken only now, with an item in hand: taking before the GET let one person's "nothing left
            # for me" hold a unit another person needed, who then stopped one answer short.
            if not budget.take():
                return
            ranking = self.answer(view["prompt"], view["responses"], self.rng)
            t0 = time.perf_counter()
            r = self.client.post(f"{base}/answers", json={"item": view["item"], "ranking": ranking})
            self.latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            self.acknowledged.append(r.json()["answer"])


class Budget:
    """A thread-safe count of answers still to submit, shared by all simulated people."""

    def __init__(self, n: int, deadline_s: float):
        self.left, self.deadline = n, time.time() + deadline_s
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0 or time.time() > self.deadline:
                return False
            self.left -= 1
            return True

    def left_to_take(self) -> bool:
        with self.lock:
            return self.left > 0 and time.time() <= self.deadline


def random_answerer(prompt: str, responses: Sequence[str], rng: random.Random) -> list:
    """A uniformly random strict order, with a tie now and then: load tests need no label model."""
    order = list(range(len(responses)))
    rng.shuffle(order)
    if len(order) > 2 and rng.random() < 0.2:
        return [sorted(order[:2])] + order[2:]
    return order


def run_http_annotators(base_url: str, tokens: Sequence[str], campaign_id: int, answers: int,
                        answer: Answerer = random_answerer, deadline_s: float = 300.0) -> list[HttpAnnotator]:
    """`len(tokens)` people answering concurrently (one thread each) until `answers` are in or time is up."""
    budget = Budget(answers, deadline_s)
    people = [HttpAnnotator(base_url, t, campaign_id, answer, seed=n) for n, t in enumerate(tokens)]
    threads = [threading.Thread(target=p.run, args=(budget,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return people


