"""The web app: JSON routes over `service`, plus one page for annotators and one for admins.

Sign-in is a bearer token (made by `alignloop annotate add-annotator`) sent in
the Authorization header; the pages keep it in sessionStorage. No cookies, so
no cross-site request can act for a signed-in person. The pages put all model
and prompt text into the DOM with `textContent`, and the Content-Security-Policy
forbids inline scripts, so a response holding `<script>` is shown as text.
"""

# No `from __future__ import annotations`: FastAPI must resolve the Annotated aliases made inside create_app.

import json
import threading
import time
from pathlib import Path
from typing import Annotated, Iterator, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from ..errors import InputError
from . import service
from .db import Annotator, get_sessionmaker, normalize_url
from .export import PAIR_POLICIES, TIE_POLICIES, expand_pairs, ranking_rows

STATIC = Path(__file__).parent / "static"
Group = Annotated[int, Field(ge=0, le=63)] | list[Annotated[int, Field(ge=0, le=63)]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AnswerIn(Strict):
    item: int
    ranking: list[Group] = Field(default_factory=list, max_length=64)
    all_bad: bool = False
    strength: Literal[1, 2, 3] | None = None
    reason: str | None = Field(default=None, max_length=service.MAX_REASON)


class ItemRef(Strict):
    item: int


class CampaignIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    mode: Literal["rank", "pairwise"] = "rank"
    overlap: int = Field(default=1, ge=1, le=100)
    lease_seconds: int = Field(default=900, ge=10, le=86400)
    items: list[dict] = Field(min_length=1)


class CampaignPatch(Strict):
    overlap: int = Field(ge=1, le=100)


class AnnotatorIn(Strict):
    name: str = Field(min_length=1, max_length=100)
    admin: bool = False


def create_app(db_url: str) -> FastAPI:
    Session = get_sessionmaker(db_url)
    app = FastAPI(title="alignloop annotate", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = "default-src 'self'; script-src 'self'; object-src 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(service.Refused)
    async def refused(_request: Request, e: service.Refused):
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    @app.exception_handler(InputError)
    async def bad_input(_request: Request, e: InputError):
        return JSONResponse({"detail": str(e)}, status_code=422)

    def session() -> Iterator[Session]:
        with Session() as s:
            yield s

    def person(s: Annotated[Session, Depends(session)],
               authorization: Annotated[str | None, Header()] = None) -> Annotator:
        token = authorization.removeprefix("Bearer ").strip() if authorization else None
        who = service.authenticate(s, token)
        if who is None:
            raise HTTPException(401, "sign in with your token", headers={"WWW-Authenticate": "Bearer"})
        return who

    def admin(who: Annotated[Annotator, Depends(person)]) -> Annotator:
        if not who.is_admin:
            raise HTTPException(403, "admins only")
        return who

    S = Annotated[Session, Depends(session)]
    Person = Annotated[Annotator, Depends(person)]
    Admin = Annotated[Annotator, Depends(admin)]

    @app.get("/", include_in_schema=False)
    def annotate_page():
        return FileResponse(STATIC / "annotate.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page():
        return FileResponse(STATIC / "admin.html")

    @app.get("/api/me")
    def me(who: Person):
        return {"name": who.name, "admin": who.is_admin}

    @app.get("/api/campaigns")
    def campaigns(s: S, who: Person):
        return [{**c, "progress": service.progress(s, who, c["id"])} for c in service.list_campaigns(s)]

    @app.get("/api/campaigns/{cid}/next")
    def next_item(cid: int, s: S, who: Person):
        return service.next_item(s, who, cid)

    @app.post("/api/campaigns/{cid}/answers", status_code=201)
    def answer(cid: int, body: AnswerIn, s: S, who: Person):
        return service.submit_answer(s, who, cid, body.item, body.ranking, body.all_bad, body.strength, body.reason)

    @app.post("/api/campaigns/{cid}/skip")
    def skip(cid: int, body: ItemRef, s: S, who: Person):
        service.skip_item(s, who, cid, body.item)
        return {"skipped": body.item}

    @app.post("/api/campaigns/{cid}/undo")
    def undo(cid: int, s: S, who: Person):
        return service.undo_last(s, who, cid)

    @app.get("/api/campaigns/{cid}/answers")
    def answers(cid: int, s: S, who: Person, annotator: str | None = None):
        """Your own answers; an admin may name anyone."""
        if annotator is None or annotator == who.name:
            return service.answers_of(s, who, cid)
        if not who.is_admin:
            raise HTTPException(403, "you can see only your own answers")
        other = s.query(Annotator).filter_by(name=annotator).one_or_none()
        if other is None:
            raise HTTPException(404, f"no annotator {annotator!r}")
        return service.answers_of(s, other, cid)

    # ---- admin ----
    @app.post("/api/admin/campaigns", status_code=201)
    def create_campaign(body: CampaignIn, s: S, _: Admin):
        c = service.create_campaign(s, body.name, body.items, body.mode, body.overlap, body.lease_seconds,
                                    source=f"campaign {body.name!r} item")
        return {"id": c.id, "name": c.name}

    @app.patch("/api/admin/campaigns/{cid}")
    def patch_campaign(cid: int, body: CampaignPatch, s: S, _: Admin):
        service.set_overlap(s, cid, body.overlap)
        return {"id": cid, "overlap": body.overlap}

    @app.get("/api/admin/campaigns/{cid}/stats")
    def stats(cid: int, s: S, _: Admin):
        return service.campaign_stats(s, cid)

    @app.get("/api/admin/campaigns/{cid}/export")
    def export(cid: int, s: S, _: Admin, kind: Literal["rankings", "pairs"] = "rankings",
               pair_policy: Literal[PAIR_POLICIES] = "all",  # type: ignore[valid-type]
               tie_policy: Literal[TIE_POLICIES] = "drop"):  # type: ignore[valid-type]
        service._campaign(s, cid)  # 404 for an unknown campaign
        rows = ranking_rows(s, [cid])
        if kind == "pairs":
            rows = expand_pairs(rows, pair_policy, tie_policy)
        return PlainTextResponse("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                 media_type="application/jsonl")

    @app.post("/api/admin/annotators", status_code=201)
    def add_annotator(body: AnnotatorIn, s: S, _: Admin):
        return {"name": body.name, "token": service.create_annotator(s, body.name, body.admin)}

    return app


def serve(db_url: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app under uvicorn until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(create_app(normalize_url(db_url)), host=host, port=port, log_level="warning")


class BackgroundServer:
    """uvicorn in a thread of this process, for tests and the demo: `with BackgroundServer(url) as base: ...`."""

    def __init__(self, db_url: str, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(create_app(normalize_url(db_url)), host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
