"""The web app: JSON routes over `service`, plus one page for annotators and one for admins.

Sign-in is a bearer token (made by `alignloop annotate add-annotator`) sent in
the Authorization header; the pages keep it in sessionStorage. No cookies, so
no cross-site request can act for a signed-in person. The pages put all model
and prompt text into the DOM with `textContent`, and the Content-Security-Policy
forbids inline scripts and framing, so a response holding `<script>` is shown as
text and no other site can frame the pages.

Every /api request passes `Guard` first, before any of its body is read: the
body's size, the server's and the person's requests in flight, the token, and
admin rights for /api/admin. Each route then opens its own session, does one
service call (one short transaction) and closes it before the response is sent.
"""

# No `from __future__ import annotations`: FastAPI must resolve the Annotated aliases made inside create_app.

import logging
import re
import threading
import time
from pathlib import Path as FilePath
from typing import IO, Annotated, Any, Callable, Iterator, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.background import BackgroundTask

from ..config import FIELD_LIMITS
from ..errors import ConfigError, InputError
from . import service
from .db import MAX_ID, Annotator, Busy, Conflict, get_sessionmaker, normalize_url
from .export import PAIR_POLICIES, TIE_POLICIES, iter_pairs, iter_ranking_rows, snapshot_jsonl

STATIC = FilePath(__file__).parent / "static"
log = logging.getLogger("alignloop.annotate")

MAX_BODY_BYTES = 64 * 1024  # any request body but a campaign upload: an answer is a few hundred bytes
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # POST /api/admin/campaigns; bigger campaigns: `alignloop annotate create-campaign`
UPLOAD_PATH = "/api/admin/campaigns"
MAX_IN_FLIGHT = 64  # /api requests being served at once; more get 503 (the thread pool has 40 workers)
MAX_IN_FLIGHT_PER_TOKEN = 8  # one person's (or one token's) requests at once; more get 429
MAX_TOKEN_CHARS = 200
MAX_ERRORS_SHOWN = 10
RETRY_AFTER_S = "1"
EXPORT_CHUNK = 64 * 1024

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
     b"form-action 'self'"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # a #token link must not leak through a Referer
    (b"cache-control", b"no-store"),
]


def safe_text(value: Any, limit: int = 100) -> str:
    """Shortened, always-encodable text for error messages (a lone surrogate would make the error a 500)."""
    return str(value)[:limit].encode("utf-8", "replace").decode("utf-8")


FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def error_location(loc: tuple) -> list:
    """Where a validation error is: field names and list positions; any other key sent is not repeated."""
    return [part if isinstance(part, int) or FIELD_NAME.fullmatch(str(part)) else "(a key not shown)" for part in loc]


def no_bad_text(value: str) -> str:
    problem = service.text_problem(value, len(value))
    if problem:
        raise ValueError(problem)
    return value


def Text(max_chars: int, min_chars: int = 0):
    return Annotated[str, Field(min_length=min_chars, max_length=max_chars), AfterValidator(no_bad_text)]


Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Position = Annotated[int, Field(ge=0, lt=service.MAX_RESPONSES)]
Group = Position | Annotated[list[Position], Field(max_length=service.MAX_RESPONSES)]
CampaignId = Annotated[int, Path(ge=1, le=MAX_ID)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AnswerIn(Strict):
    item: Id
    ranking: list[Group] = Field(default_factory=list, max_length=service.MAX_RESPONSES)
    all_bad: bool = False
    strength: Annotated[int, Field(ge=1, le=3)] | None = None  # strict int: true and 2.0 are refused
    reason: Text(service.MAX_REASON) | None = None


class ItemRef(Strict):
    item: Id


class CampaignIn(Strict):
    name: Text(service.MAX_CAMPAIGN_NAME, 1)
    mode: Literal["rank", "pairwise"] = "rank"
    overlap: int = Field(default=1, ge=1, le=100)
    lease_seconds: int = Field(default=900, ge=10, le=86400)
    # Each item is checked field by field by service.create_campaign, as a campaign file's lines are.
    items: list[dict] = Field(min_length=1, max_length=service.MAX_ITEMS)


class CampaignPatch(Strict):
    overlap: int = Field(ge=1, le=100)


class AnnotatorIn(Strict):
    name: Text(service.MAX_NAME, 1)
    admin: bool = False


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key == b"authorization":
            text = value.decode("latin-1")
            return text[7:].strip() if text[:7].lower() == "bearer " else None
    return None


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


def body_limit(path: str) -> int:
    return MAX_UPLOAD_BYTES if path == UPLOAD_PATH else MAX_BODY_BYTES


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on as a 413 instead of a 400."""

    def __init__(self):
        super().__init__(413, "the request body is too large")


class Guard:
    """ASGI middleware: security headers on every response (500s included) and, for /api, the checks
    that must come before a body is read or a worker thread is taken."""

    def __init__(self, app, sessions):
        self.app, self.sessions = app, sessions
        self.in_flight = 0
        self.per_token: dict[str, int] = {}  # only touched on the event loop thread: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k for k, _ in SECURITY_HEADERS}
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k not in names] + SECURITY_HEADERS
            await send(message)

        try:
            if scope["path"].startswith("/api/"):
                await self.guarded(scope, receive, send_with_headers)
            else:
                await self.app(scope, limited(receive, MAX_BODY_BYTES), send_with_headers)
        except BodyTooLarge:
            if not started:
                await reply(send_with_headers, 413, "the request body is too large")
        except Exception:  # the last line of defence: log it, answer 500 with the headers, never a traceback
            log.exception("unhandled error in %s %s", scope.get("method"), safe_text(scope.get("path"), 200))
            if not started:
                await reply(send_with_headers, 500, "internal error (logged on the server)")

    async def guarded(self, scope, receive, send):
        headers = scope.get("headers", [])
        limit = body_limit(scope["path"])
        length = header(headers, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await reply(send, 413, f"the request body must be at most {limit} bytes")
        token = bearer_token(headers)
        if not token or len(token) > MAX_TOKEN_CHARS:
            return await reply(send, 401, "sign in with your token", {"www-authenticate": "Bearer"})
        if self.in_flight >= MAX_IN_FLIGHT:
            return await reply(send, 503, "the server is busy; try again in a moment", {"retry-after": RETRY_AFTER_S})
        key = service.hash_token(token)
        if self.per_token.get(key, 0) >= MAX_IN_FLIGHT_PER_TOKEN:
            return await reply(send, 429, f"at most {MAX_IN_FLIGHT_PER_TOKEN} requests at once per person",
                               {"retry-after": RETRY_AFTER_S})
        self.in_flight += 1
        self.per_token[key] = self.per_token.get(key, 0) + 1
        try:
            try:
                who = await anyio.to_thread.run_sync(self.lookup, token)
            except Busy as e:
                return await reply(send, 503, str(e), {"retry-after": RETRY_AFTER_S})
            if who is None:
                return await reply(send, 401, "sign in with your token", {"www-authenticate": "Bearer"})
            if scope["path"].startswith("/api/admin/") and not who.is_admin:
                return await reply(send, 403, "admins only")
            scope.setdefault("state", {})["annotator"] = who
            await self.app(scope, limited(receive, limit), send)
        finally:
            self.in_flight -= 1
            self.per_token[key] -= 1
            if not self.per_token[key]:
                del self.per_token[key]

    def lookup(self, token: str) -> Annotator | None:
        try:
            with self.sessions() as s:
                return service.authenticate(s, token)
        except (OperationalError, PoolTimeout):
            raise Busy("the database is busy; try again in a moment") from None


def limited(receive, limit: int):
    """`receive` that stops a chunked (or lying) body once it passes `limit` bytes."""
    seen = 0

    async def receive_limited():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge()
        return message

    return receive_limited


async def reply(send, status: int, detail: str, extra: dict[str, str] | None = None) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=extra)
    await response({"type": "http"}, None, send)


def file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    try:
        while chunk := f.read(EXPORT_CHUNK):
            yield chunk
    finally:
        f.close()


def error(status: int, detail: str, extra: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=extra)


bearer = HTTPBearer(auto_error=False, description="the sign-in token from `alignloop annotate add-annotator`")


async def person(request: Request, _token: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Annotator:
    who = getattr(request.state, "annotator", None)  # set by Guard, which refused a bad token already
    if who is None:
        raise HTTPException(401, "sign in with your token", headers={"WWW-Authenticate": "Bearer"})
    return who


async def admin(who: Annotated[Annotator, Depends(person)]) -> Annotator:
    if not who.is_admin:
        raise HTTPException(403, "admins only")
    return who


Person = Annotated[Annotator, Depends(person)]
Admin = Annotated[Annotator, Depends(admin)]
ServiceCall = Callable[..., Any]  # db(service_function, *args): one call in its own session


def create_app(db_url: str) -> FastAPI:
    Session = get_sessionmaker(db_url)
    app = FastAPI(title="alignloop annotate", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, sessions=Session)
    add_error_handlers(app)

    def db(fn: Callable[..., Any], *args: Any) -> Any:
        """One service call in its own session, closed before the response is sent."""
        with Session() as s:
            return fn(s, *args)

    add_annotator_routes(app, db)
    add_admin_routes(app, db)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(service.Refused)
    async def refused(_request: Request, e: service.Refused):
        return error(e.status, str(e))

    @app.exception_handler(InputError)
    async def bad_input(_request: Request, e: InputError):
        return error(422, safe_text(e, 500))

    @app.exception_handler(Conflict)
    async def conflict(_request: Request, e: Conflict):
        return error(409, str(e))

    @app.exception_handler(Busy)
    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def busy(_request: Request, e: Exception):
        if not isinstance(e, Busy):
            log.warning("database unavailable: %s", safe_text(e, 300))
        return error(503, "the database is busy; try again in a moment", {"retry-after": RETRY_AFTER_S})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError):
        # Where and what, never the input itself: it may be huge, or not encodable as JSON (NaN, surrogates).
        shown = [{"loc": error_location(err.get("loc", ())), "msg": safe_text(err.get("msg"), 200)}
                 for err in e.errors()[:MAX_ERRORS_SHOWN]]
        return JSONResponse({"detail": shown}, status_code=422)


def campaigns_with_progress(s, who: Annotator) -> list[dict]:
    return [{**c, "progress": service.progress(s, who, c["id"])} for c in service.list_campaigns(s)]


def answers_for(s, who: Annotator, cid: int, name: str | None) -> list[dict]:
    if name is None or name == who.name:
        return service.answers_of(s, who, cid)
    if not who.is_admin:
        raise HTTPException(403, "you can see only your own answers")
    return service.answers_of(s, service.find_annotator(s, name), cid)


def export_snapshot(s, cid: int, kind: str, pair_policy: str, tie_policy: str) -> IO[bytes]:
    service.get_campaign(s, cid)  # 404 for an unknown campaign
    rows = iter_ranking_rows(s, [cid])
    return snapshot_jsonl(iter_pairs(rows, pair_policy, tie_policy) if kind == "pairs" else rows)


def add_annotator_routes(app: FastAPI, db: ServiceCall) -> None:
    @app.get("/", include_in_schema=False)
    def annotate_page():
        return FileResponse(STATIC / "annotate.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page():
        return FileResponse(STATIC / "admin.html")

    @app.get("/api/me")
    async def me(who: Person):
        return {"name": who.name, "admin": who.is_admin}

    @app.get("/api/campaigns")
    def campaigns(who: Person):
        return db(campaigns_with_progress, who)

    @app.get("/api/campaigns/{cid}/next")
    def next_item(cid: CampaignId, who: Person):
        return db(service.next_item, who, cid)

    @app.post("/api/campaigns/{cid}/answers", status_code=201)
    def answer(cid: CampaignId, body: AnswerIn, who: Person):
        return db(service.submit_answer, who, cid, body.item, body.ranking, body.all_bad, body.strength, body.reason)

    @app.post("/api/campaigns/{cid}/skip")
    def skip(cid: CampaignId, body: ItemRef, who: Person):
        db(service.skip_item, who, cid, body.item)
        return {"skipped": body.item}

    @app.post("/api/campaigns/{cid}/undo")
    def undo(cid: CampaignId, who: Person):
        return db(service.undo_last, who, cid)

    @app.get("/api/campaigns/{cid}/answers")
    def answers(cid: CampaignId, who: Person,
                annotator: Annotated[str | None, Query(max_length=service.MAX_NAME)] = None):
        """Your own answers; an admin may name anyone."""
        return db(answers_for, who, cid, annotator)


def add_admin_routes(app: FastAPI, db: ServiceCall) -> None:
    @app.post("/api/admin/campaigns", status_code=201)
    def create_campaign(body: CampaignIn, _: Admin):
        c = db(service.create_campaign, body.name, body.items, body.mode, body.overlap, body.lease_seconds,
               "uploaded campaign, item")
        return {"id": c.id, "name": c.name}

    @app.patch("/api/admin/campaigns/{cid}")
    def patch_campaign(cid: CampaignId, body: CampaignPatch, _: Admin):
        db(service.set_overlap, cid, body.overlap)
        return {"id": cid, "overlap": body.overlap}

    @app.get("/api/admin/campaigns/{cid}/stats")
    def stats(cid: CampaignId, _: Admin):
        return db(service.campaign_stats, cid)

    @app.get("/api/admin/campaigns/{cid}/export")
    def export(cid: CampaignId, _: Admin, kind: Literal["rankings", "pairs"] = "rankings",
               pair_policy: Literal[PAIR_POLICIES] = "all",  # type: ignore[valid-type]
               tie_policy: Literal[TIE_POLICIES] = "drop"):  # type: ignore[valid-type]
        # Read into a file in one short read transaction; the session is closed before the first byte
        # is sent, so a client that reads slowly (or never) holds no lock and no database connection.
        f = db(export_snapshot, cid, kind, pair_policy, tie_policy)
        return StreamingResponse(file_chunks(f), media_type="application/jsonl", background=BackgroundTask(f.close))

    @app.post("/api/admin/annotators", status_code=201)
    def add_annotator(body: AnnotatorIn, _: Admin):
        return {"name": body.name, "token": db(service.create_annotator, body.name, body.admin)}


def check_port(port: int) -> None:
    """The bound AnnotateConfig checks, for the callers that take a port without a config."""
    low, high = FIELD_LIMITS["port"]
    if not low <= port <= high:
        raise ConfigError(f"port must be in {low}-{high} (0: any free port), got {port}")


def serve(db_url: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app under uvicorn until interrupted (blocking)."""
    import uvicorn

    check_port(port)
    uvicorn.run(create_app(normalize_url(db_url)), host=host, port=port, log_level="warning")


class BackgroundServer:
    """uvicorn in a thread of this process, for tests and the demo: `with BackgroundServer(url) as base: ...`."""

    def __init__(self, db_url: str, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        check_port(port)
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
