"""Preference collection: a web app for people, simulated annotators, exports for reward training.

Modules: `db` (tables), `service` (the logic behind every route), `app` (FastAPI),
`agreement` (pure agreement functions), `export` (rankings and TRL pairs),
`simulate` (label-function annotators), `cli` (`alignloop annotate ...`).
"""

from __future__ import annotations


def serve(db_url: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the annotation app under uvicorn (blocking)."""
    from .app import serve as _serve

    _serve(db_url, host, port)


def campaign_progress(db_url: str, campaign_id: int) -> tuple[int, int]:
    """(done, total) answers of a campaign; finished when equal."""
    from .service import campaign_progress as _progress

    return _progress(db_url, campaign_id)
