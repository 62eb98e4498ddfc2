"""`alignloop annotate ...`: thin commands over `service`, `export`, `simulate` and `app`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Collect preferences: a web app for people, simulated annotators, export.")
DEFAULT_DB = "runs/annotate/annotations.db"
DbOpt = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL, or a path meaning SQLite.")


def _print(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def serve(db: str = DbOpt, host: str = "127.0.0.1", port: int = 8000):
    """Serve the annotator page at / and the admin page at /admin."""
    from .app import serve as run

    typer.echo(f"annotators: http://{host}:{port}/   admins: http://{host}:{port}/admin", err=True)
    run(db, host, port)


@app.command("add-annotator")
def add_annotator(name: str, db: str = DbOpt, admin: bool = typer.Option(False, help="May create campaigns and export.")):
    """Make a person and print their sign-in token (only its hash is stored: keep it now)."""
    from . import service
    from .db import get_sessionmaker

    with get_sessionmaker(db)() as s:
        token = service.create_annotator(s, name, admin)
    _print({"name": name, "admin": admin, "token": token})


@app.command()
def revoke(name: str, db: str = DbOpt):
    """Revoke a person's token: it stops working at once, their held items return to the pool, answers stay."""
    from . import service
    from .db import get_sessionmaker

    with get_sessionmaker(db)() as s:
        _print(service.revoke_token(s, name))


@app.command("new-token")
def new_token(name: str, db: str = DbOpt):
    """Give an existing person a fresh token (the old one stops working); printed once, only its hash is kept."""
    from . import service
    from .db import get_sessionmaker

    with get_sessionmaker(db)() as s:
        _print({"name": name, "token": service.new_token(s, name)})


@app.command("create-campaign")
def create_campaign(campaign: Path, db: str = DbOpt, name: Optional[str] = None,
                    mode: str = typer.Option("rank", help="rank (all K) or pairwise (the first two responses)."),
                    overlap: int = typer.Option(1, help="Distinct annotators per item."),
                    lease_seconds: int = typer.Option(900, help="How long an item is held for one person.")):
    """Import a campaign file written by `alignloop sample`."""
    from . import service
    from .db import get_sessionmaker

    with get_sessionmaker(db)() as s:
        c = service.create_campaign(s, name or campaign.stem, service.read_campaign_file(campaign), mode, overlap,
                                    lease_seconds, source=str(campaign))
        _print({"campaign": c.id, "name": c.name, "items": service.list_campaigns(s)[-1]["items"]})


@app.command()
def export(out_dir: Path, db: str = DbOpt,
           campaign: Optional[list[int]] = typer.Option(None, help="Campaign id (repeatable); default: all."),
           pair_policy: str = typer.Option("all", help="all | best_vs_rest | adjacent"),
           tie_policy: str = typer.Option("drop", help="drop | half"),
           dataset: bool = typer.Option(True, help="Also write a datasets.save_to_disk directory of pairs.")):
    """Write rankings.jsonl, preferences.jsonl and preferences/ (a datasets directory)."""
    from .db import get_sessionmaker
    from .export import ranking_rows, write_exports

    with get_sessionmaker(db)() as s:
        _print(write_exports(ranking_rows(s, campaign or None), out_dir, "", pair_policy, tie_policy, dataset))


@app.command()
def stats(campaign: int, db: str = DbOpt):
    """Progress, time per item, agreement and position bias of one campaign."""
    from . import service
    from .db import get_sessionmaker

    with get_sessionmaker(db)() as s:
        _print(service.campaign_stats(s, campaign))


@app.command()
def simulate(campaign: Path, out_dir: Path, label_function: str = "vader", annotators: int = 3, overlap: int = 1,
             noise: float = 0.1, mode: str = "rank", seed: int = 0, db: Optional[str] = None):
    """Simulated annotators answer every item through the service, then export."""
    from .simulate import run_simulated_annotation
    from .stage import AnnotateConfig

    # The pipeline's annotate section and this command check the same values the same way.
    c = AnnotateConfig.load(campaign=campaign, out_dir=out_dir, label_function=label_function, annotators=annotators,
                            overlap=overlap, noise=noise, mode=mode, seed=seed, db_url=db)
    _print(run_simulated_annotation(Path(c.campaign), Path(c.out_dir), c.label_function, c.annotators, c.overlap,
                                    c.noise, c.mode, c.seed, c.db_url))
