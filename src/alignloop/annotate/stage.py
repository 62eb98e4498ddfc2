"""The annotate stage: people (or simulated people) rank the sampled responses.

Simulated people are a label function plus noise, answering in-process through the same
service functions as the web app's routes; with `human`, the app is served and the stage
waits until every item has its `overlap` answers. Either way it exports this campaign's
rankings and pairs, and every campaign's so far (`all_*`: the reward model's data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import StageConfig
from ..stage import RoundState, StageContext, run_stage


@dataclass
class AnnotateConfig(StageConfig):
    """Simulated people (a label function plus noise) or, with `human`, the web app."""

    campaign: Path = Path("runs/demo/sample/campaign.jsonl")
    out_dir: Path = Path("runs/demo/annotate")
    label_function: str = "vader"  # 'vader', 'afinn', 'module:function' or 'file.py:function'
    annotators: int = 3
    overlap: int = 1  # answers per item (> 1 gives inter-annotator agreement figures)
    noise: float = 0.1  # share of random answers of a simulated person
    mode: str = "rank"  # 'rank' (all K at once) or 'pairwise'
    seed: int = 0
    db_url: str | None = None  # None: sqlite:///<out_dir>/annotations.db
    human: bool = False  # serve the app and wait for people instead of simulating them
    host: str = "127.0.0.1"
    port: int = 8000
    poll_seconds: float = 5.0

    def validate(self) -> None:
        from ..labelers import load_label_function

        self.require(self.annotators >= 1, "annotators must be >= 1")
        self.require(self.overlap >= 1, "overlap must be >= 1")
        self.require(self.overlap <= self.annotators, f"overlap ({self.overlap}) cannot exceed annotators "
                                                      f"({self.annotators}): one person answers an item once")
        self.require(0 <= self.noise <= 1, "noise is a share of answers, in [0, 1]")
        self.require(self.mode in ("rank", "pairwise"), f"mode must be 'rank' or 'pairwise', got '{self.mode}'")
        self.require(self.poll_seconds > 0, "poll_seconds must be > 0")
        if not self.human:
            with self.about("label_function"):
                load_label_function(self.label_function)  # fail now, not after sampling

    @property
    def database(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.out_dir).resolve() / 'annotations.db'}"


class AnnotateStage:
    name = "annotate"
    config_class = AnnotateConfig

    def outputs(self, config: AnnotateConfig) -> dict[str, Path]:
        out = Path(config.out_dir)
        return {"rankings": out / "rankings.jsonl", "preferences": out / "preferences.jsonl",
                "all_rankings": out / "all_rankings.jsonl", "all_preferences": out / "all_preferences.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """This round's campaign, into one database shared by every round (so `all_*` grows)."""
        wired = {"campaign": state.outputs["sample"]["campaign"], "out_dir": state.dir / "annotate",
                 "db_url": f"sqlite:///{(state.out / 'annotations.db').resolve()}", "human": state.human}
        return {**wired, **user, "human": state.human or bool(user.get("human", False)), "seed": state.seed(user)}

    def run(self, config: AnnotateConfig, ctx: StageContext) -> dict[str, Any]:
        if config.human:
            return human_annotation(config, ctx=ctx)
        from .simulate import run_simulated_annotation

        return run_simulated_annotation(Path(config.campaign), Path(config.out_dir), config.label_function,
                                        config.annotators, config.overlap, config.noise, config.mode, config.seed,
                                        config.database)


STAGE = AnnotateStage()


def annotate(config: AnnotateConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Collect rankings for `config.campaign` and export them; returns the summary."""
    return run_stage(STAGE, config, ctx)


def human_annotation(config: AnnotateConfig, on_ready: Callable[[str, dict[str, str]], None] | None = None,
                     ctx: StageContext | None = None) -> dict[str, Any]:
    """Import the campaign, serve the app, print its address and sign-in links, wait until every item
    has its `overlap` answers, then export this round's and every round's answers."""
    from sqlalchemy import select

    from . import service
    from .app import BackgroundServer
    from .db import Annotator, get_sessionmaker
    from .export import ranking_rows, write_exports

    say = ctx.log if ctx is not None else StageContext.log
    campaign_file, out_dir, db_url = Path(config.campaign), Path(config.out_dir), config.database
    Session = get_sessionmaker(db_url)
    tokens: dict[str, str] = {}
    with Session() as s:
        camp = service.open_campaign(s, campaign_file, config.mode, config.overlap)
        campaign_id, name = camp.id, camp.name
        for who, admin in [("admin", True)] + [(f"annotator-{i + 1}", False) for i in range(config.annotators)]:
            if s.scalar(select(Annotator).where(Annotator.name == who)) is None:
                tokens[who] = service.create_annotator(s, who, admin)
    with BackgroundServer(db_url, config.host, config.port) as base:
        say(f"annotate: campaign {campaign_id} ({name}) is open at {base}/  (admin page: {base}/admin)")
        for who, token in tokens.items():
            say(f"annotate:   {who}: {base}/{'admin' if who == 'admin' else ''}#token={token}")
        if not tokens:
            say("annotate:   (the annotators exist from an earlier round; their tokens were shown then; "
                "`alignloop annotate add-annotator NAME --db ...` makes another)")
        if on_ready is not None:
            on_ready(base, tokens)
        wait_for_answers(db_url, campaign_id, config.poll_seconds, say)
    with Session() as s:
        stats = service.campaign_stats(s, campaign_id)
        this = write_exports(ranking_rows(s, [campaign_id]), out_dir)
        every = write_exports(ranking_rows(s), out_dir, prefix="all_")
    return {"people": "human", "campaign": campaign_id, "campaign_name": name, "db": db_url,
            "items": stats["items"], "answers": stats["answers"], "pairs": this["pairs"],
            "agreement": stats["agreement"], "position_bias": stats["position_bias"],
            "all_rankings": every["rankings"], "all_pairs": every["pairs"]}


def wait_for_answers(db_url: str, campaign_id: int, poll_seconds: float, say: Callable[[str], None]) -> None:
    from . import campaign_progress

    last = None
    while True:
        done, total = campaign_progress(db_url, campaign_id)
        if (done, total) != last:
            say(f"annotate: {done}/{total} answers")
            last = (done, total)
        if done >= total:
            return
        time.sleep(poll_seconds)
