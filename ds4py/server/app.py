"""FastAPI app and `ds4py serve`: routes, guards, and the bridge from handlers to the worker.

Owns the HTTP surface (RUNTIME.md §5.2, §5.10, §5.11): model listing, health, the generation
endpoints (each a thin call into openai.py / anthropic.py / responses.py), error shapes per
protocol, API key, CORS, body limit, SSE keepalive, and disconnect -> cancel. Prompt rendering
is in prompt.py, generation in worker.py / generate.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..kv.store import KVStore, KVStoreOptions
from . import anthropic, openai, responses
from .common import (
    MODEL_ALIASES,
    APIError,
    Done,
    Failed,
    IdMaker,
    Job,
    Progress,
    anthropic_error_body,
    openai_error_body,
)
from .options import ServerOptions
from .prompt import Prompter
from .schemas import (
    ChatRequest,
    CompletionRequest,
    CountTokensRequest,
    MessagesRequest,
    ResponsesRequest,
)
from .sse import Channel, EventStream
from .toolmem import ToolMemory
from .worker import Worker

log = logging.getLogger("ds4py.server")
CREATED = 1767225600  # fixed "created" of the model objects (2026-01-01)

# ---- Errors ----------------------------------------------------------------------------------


def _anthropic_style(scope: Scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return scope.get("path", "").startswith("/v1/messages") or b"anthropic-version" in headers


def error_response(scope: Scope, status: int, message: str,
                   kind: str = "invalid_request_error", **extra) -> JSONResponse:  # fmt: skip
    body = (anthropic_error_body if _anthropic_style(scope) else openai_error_body)(
        message, kind, **extra
    )
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            parts.append("invalid JSON request body")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(request.scope, exc.status, exc.message, exc.kind, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(request.scope, 400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "unknown endpoint" if exc.status_code == 404 else str(exc.detail)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request.scope, exc.status_code, message, kind)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(request.scope, 500, f"internal error: {exc}", "server_error")


# ---- Guards: OPTIONS / CORS, API key, body size ----------------------------------------------

CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"*"),
]


class Guard:
    """Pure ASGI middleware in front of every route (also in front of FastAPI's errors)."""

    def __init__(self, app: ASGIApp, opts: ServerOptions) -> None:
        self.app, self.opts = app, opts
        self.max_body = opts.max_body_mb << 20

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.opts.cors:
            send = self._with_cors(send)
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            return await send({"type": "http.response.body", "body": b""})
        if not self._authorized(scope):
            msg = "invalid or missing API key (send Authorization: Bearer KEY or x-api-key: KEY)"
            kind = "authentication_error"
            return await error_response(scope, 401, msg, kind)(scope, receive, send)
        if scope["method"] == "POST":
            body = await self._read_body(receive)
            if body is None:
                msg = f"request body exceeds {self.opts.max_body_mb} MiB"
                return await error_response(scope, 413, msg, "request_too_large")(
                    scope, receive, send
                )
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _with_cors(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + CORS_HEADERS}
            await send(message)

        return wrapped

    def _authorized(self, scope: Scope) -> bool:
        key = self.opts.api_key
        if not key or scope.get("path") == "/health":
            return True
        headers = dict(scope.get("headers") or [])
        given = [headers.get(b"x-api-key", b"")]
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given.append(auth[7:].strip())
        return any(hmac.compare_digest(g, key.encode()) for g in given)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: wait for the disconnect

    return replay


# ---- Running a job ---------------------------------------------------------------------------


@dataclass
class Server:
    """What the handlers share; the engine itself is only touched by the worker thread."""

    engine: Any
    opts: ServerOptions
    worker: Worker
    prompter: Prompter
    ids: IdMaker = field(default_factory=IdMaker)

    def model_id(self, requested: str | None) -> str:
        return requested or self.opts.model_id


GONE = object()  # _next_event: the client disconnected (and the job was cancelled)


async def _next_event(ch: Channel, job: Job, request: Request, timeout: float):
    """Next worker event; None after `timeout` without one; GONE once the client is gone."""
    ev = await ch.get(timeout)
    if ev is None and await request.is_disconnected():
        job.cancel.set()  # the worker skips it if still queued, else stops within a token
        return GONE
    return ev


async def run_job(srv: Server, request: Request, job: Job, stream: bool,
                  stream_fmt: Any, body: Callable[[Done], dict]) -> Response:  # fmt: skip
    ch = Channel(asyncio.get_running_loop())
    job.sink = ch.push
    srv.worker.submit(job)
    keepalive = srv.opts.keepalive_s
    waited, poll = 0.0, min(1.0, keepalive)
    while True:
        ev = await _next_event(ch, job, request, poll)
        if ev is GONE:
            return Response(status_code=499)  # nobody reads it; closes the exchange
        if isinstance(ev, Failed):
            raise ev.error
        # A stream opens with the first event, or after `keepalive` in the queue: from then on
        # comments keep the client waiting and a late failure becomes an SSE error event.
        if stream and (ev is not None or waited >= keepalive):
            return EventStream(_sse(ev, ch, stream_fmt, keepalive), job.cancel.set)
        if isinstance(ev, Done):
            return JSONResponse(body(ev))
        waited += poll


async def _sse(first, ch: Channel, fmt, keepalive: float) -> AsyncIterator[str]:
    ev, last = first, time.monotonic()
    while True:
        if ev is None or isinstance(ev, Progress):
            if time.monotonic() - last >= keepalive:
                yield ": keepalive\n\n"  # long prefill: keep clients and proxies waiting
                last = time.monotonic()
        elif isinstance(ev, Failed):
            yield fmt.error(ev.error.message)
            return
        else:
            for chunk in fmt.feed(ev):
                yield chunk
                last = time.monotonic()
            if isinstance(ev, Done):
                return
        ev = await ch.get(keepalive)


# ---- Routes ----------------------------------------------------------------------------------


def _model_object(model_id: str, opts: ServerOptions) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "type": "model",
        "created": CREATED,
        "created_at": "2026-01-01T00:00:00Z",
        "owned_by": "ds4py",
        "display_name": "DeepSeek V4 Flash",
        "name": "DeepSeek V4 Flash",
        "context_length": opts.ctx,
        "top_provider": {
            "context_length": opts.ctx,
            "max_completion_tokens": min(opts.max_tokens, opts.ctx),
            "is_moderated": False,
        },
        "supported_parameters": [
            "tools",
            "tool_choice",
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "stop",
            "seed",
            "stream",
            "reasoning_effort",
        ],
    }


def _add_routes(app: FastAPI, srv: Server) -> None:
    model_ids = [srv.opts.model_id, *MODEL_ALIASES]

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": srv.opts.model_id,
            "ctx": srv.opts.ctx,
            "queued": srv.worker.pending(),
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        data = [_model_object(m, srv.opts) for m in model_ids]
        return {
            "object": "list",
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"],
            "last_id": data[-1]["id"],
        }

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        if model_id not in model_ids:
            raise APIError(404, f"model {model_id!r} not found", "not_found_error", param="model")
        return _model_object(model_id, srv.opts)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        job = await run_in_threadpool(srv.prompter.chat_job, req)
        meta = openai.Meta(f"chatcmpl-{srv.ids.seq()}", int(time.time()), srv.model_id(req.model))
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(
            srv,
            request,
            job,
            bool(req.stream),
            openai.ChatStream(meta, include),
            lambda d: openai.chat_response(d, meta),
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        job = await run_in_threadpool(srv.prompter.completion_job, req)
        meta = openai.Meta(f"cmpl-{srv.ids.seq()}", int(time.time()), srv.model_id(req.model))
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(
            srv,
            request,
            job,
            bool(req.stream),
            openai.CompletionStream(meta, include),
            lambda d: openai.completion_response(d, meta),
        )

    @app.post("/v1/messages")
    async def messages(req: MessagesRequest, request: Request) -> Response:
        job = await run_in_threadpool(srv.prompter.messages_job, req)
        meta = openai.Meta(IdMaker.hex("msg_"), int(time.time()), srv.model_id(req.model))
        return await run_job(
            srv,
            request,
            job,
            bool(req.stream),
            anthropic.MessageStream(meta),
            lambda d: anthropic.message_response(d, meta),
        )

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountTokensRequest) -> dict:
        n = await run_in_threadpool(srv.prompter.count_messages, req)
        return anthropic.count_response(n)

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, request: Request) -> Response:
        job, wire = await run_in_threadpool(srv.prompter.responses_job, req)
        meta = responses.RMeta(
            IdMaker.hex("resp_"),
            int(time.time()),
            srv.model_id(req.model),
            responses.summary_opted_in(req),
            wire,
        )
        return await run_job(
            srv,
            request,
            job,
            bool(req.stream),
            responses.ResponseStream(meta),
            lambda d: responses.response_object(d, meta),
        )


# ---- Construction ----------------------------------------------------------------------------


def store_options(opts: ServerOptions) -> KVStoreOptions:
    """The disk-cache thresholds (validated: a bad combination is a ValueError)."""
    return KVStoreOptions(
        min_tokens=opts.kv_cache_min_tokens,
        cold_max_tokens=opts.kv_cache_cold_max_tokens,
        continued_interval_tokens=opts.kv_cache_continued_interval_tokens,
        boundary_trim_tokens=opts.kv_cache_boundary_trim_tokens,
        boundary_align_tokens=opts.kv_cache_boundary_align_tokens,
    )


def open_store(engine, opts: ServerOptions) -> KVStore:
    budget = opts.kv_disk_space_mb << 20
    options = store_options(opts)
    return KVStore(opts.kv_disk_dir, fingerprint=engine.fingerprint, budget_bytes=budget,
                   options=options)  # fmt: skip


def create_app(engine, options: ServerOptions | None = None) -> FastAPI:
    """The ASGI app serving `engine`; its worker thread starts now, stops at app shutdown."""
    opts = options or ServerOptions()
    toolmem = ToolMemory(opts.tool_memory_max_ids if opts.exact_dsml_replay else 0)
    store = open_store(engine, opts) if opts.kv_disk_dir else None
    worker = Worker(engine, opts.ctx, toolmem, store)
    srv = Server(engine, opts, worker, Prompter(engine.tokenizer, opts, toolmem))
    worker.start()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="ds4py",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI and Anthropic compatible API for DeepSeek V4 Flash",
    )
    app.state.server = srv
    _install_error_handlers(app)
    _add_routes(app, srv)
    app.add_middleware(Guard, opts=opts)
    return app


def serve(args: argparse.Namespace | ServerOptions) -> int:
    """`ds4py serve`: open the model (or the demo model), then run uvicorn until interrupted."""
    import uvicorn

    from ..cli import open_engine

    opts = args if isinstance(args, ServerOptions) else ServerOptions.from_namespace(args)
    if opts.kv_disk_dir:
        store_options(opts)  # refuse bad cache flags before the (long) model load
    fmt = "%(asctime)s %(name)s: %(message)s"
    logging.basicConfig(level=opts.log_level.upper(), format=fmt, datefmt="%m%d %H:%M:%S")
    engine = open_engine(argparse.Namespace(model=opts.model, device=opts.device, demo=opts.demo))
    app = create_app(engine, opts)
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who reaches it can use it", opts.host
        )
    what = "the demo model" if opts.demo else opts.model
    log.info("serving %s at http://%s:%d (ctx %d)", what, opts.host, opts.port, opts.ctx)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                timeout_graceful_shutdown=5)  # fmt: skip
    return 0
