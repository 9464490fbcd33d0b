"""The HTTP edge: OpenAI-compatible completions and chat (SSE streaming or not), models,
health and metrics, with errors in the OpenAI shape. The serving itself is serving.py's;
this process never imports torch or the model."""

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp

from baton.config import BatonConfig, GatewayConfig
from baton.gateway import metrics as M
from baton.gateway.admission import Admission, Overloaded
from baton.gateway.autoscale import Autoscaler
from baton.gateway.backend import Backend
from baton.gateway.limits import BodyLimit, WriteTimeout
from baton.gateway.openai_types import (
    BadRequest,
    ChatCompletionResponse,
    ChatRequest,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    ModelNotFound,
    error_response,
)
from baton.gateway.params import check_priority
from baton.gateway.router import NoCapacity, Router
from baton.gateway.serving import Gateway
from baton.gateway.sessions import CacheScope, LiveSessions, cache_salt, session_ttl
from baton.gateway.tools import load_template
from baton.plane import Keys
from baton.probe import Probe

PROBE_REFRESH_S = 1.0  # how old the probe port's health and gauges may be

log = logging.getLogger("baton.gateway")

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
# 200: the route's response model as JSON, or with `stream` server-sent events: each `data:`
# line one chunk (CompletionStreamResponse, ChatCompletionStreamResponse), then `data: [DONE]`.
# Before OpenAPI 3.2 (itemSchema), an event stream's schema describes each event
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
GENERATION_RESPONSES = {**ERRORS, 200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def serving(request: Request) -> Gateway:
    """The app's Gateway, made by its lifespan."""
    return request.app.state.gateway


Serving = Annotated[Gateway, Depends(serving)]


def error(
    exc: Exception | str,
    type_: str,
    code: int,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_response(str(exc), type_, code, param).model_dump()
    return JSONResponse(body, code, headers=headers)


class ApiKey(BaseHTTPMiddleware):
    """Every route but /health wants `Authorization: Bearer <key>`, one of `keys`; with
    `per_tenant`, the key's tenant (a digest, never the key) goes to request.state.tenant."""

    def __init__(self, app: ASGIApp, keys: list[str], per_tenant: bool):
        super().__init__(app)
        self.expected = [f"Bearer {k}".encode() for k in keys]
        self.tenants = [hashlib.sha256(k.encode()).hexdigest()[:16] for k in keys]
        self.per_tenant = per_tenant

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path == "/health":
            return await call_next(request)
        given = request.headers.get("authorization", "").encode()
        # each compared in constant time, and all of them: how long a wrong key takes says
        # nothing of a right one
        matches = [hmac.compare_digest(given, e) for e in self.expected]
        if not any(matches):
            return error("invalid or missing API key", "authentication_error", 401)
        if self.per_tenant:
            request.state.tenant = self.tenants[matches.index(True)]
        return await call_next(request)


def api_keys(gw: GatewayConfig) -> list[str]:
    """The keys a request may carry: `api_key`, and each line of `api_key_file`."""
    keys = [gw.api_key] if gw.api_key else []
    if gw.api_key_file:
        lines = Path(gw.api_key_file).read_text().splitlines()
        keys += [k.strip() for k in lines if k.strip() and not k.startswith("#")]
    return keys


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """404, 405 and 413 in the OpenAI error shape too."""
    return error(exc.detail, "invalid_request_error", exc.status_code, headers=exc.headers)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    why = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":  # a field this server does not implement
        why = "not supported by this server (README: the OpenAI parameters)"
    message = f"{param}: {why}" if param else "invalid request"
    M.REQUESTS.labels("400").inc()
    return error(message, "invalid_request_error", 400, param)


async def not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
    M.REQUESTS.labels("404").inc()
    return error(exc, "invalid_request_error", 404, "model")


async def bad(request: Request, exc: BadRequest) -> JSONResponse:
    M.REQUESTS.labels("400").inc()
    return error(exc, "invalid_request_error", 400, exc.param)


async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    M.REQUESTS.labels("429").inc()
    return error(exc, "rate_limit_exceeded", 429, headers={"Retry-After": str(exc.retry_after_s)})


async def busy(request: Request, exc: NoCapacity) -> JSONResponse:
    M.REQUESTS.labels("503").inc()
    return error(exc, "service_unavailable", 503)


HANDLERS = {
    HTTPException: http_error,
    RequestValidationError: invalid,
    ModelNotFound: not_found,
    BadRequest: bad,
    Overloaded: overloaded,
    NoCapacity: busy,
}


def health_body(backend: Backend) -> tuple[bool, dict]:
    pools = {r: len(backend.registry.pool(r)) for r in ("prefill", "decode")}
    body = {"healthy": backend.healthy, **pools}
    if backend.autoscaler.total:  # the split `baton up --autoscale` acts on, and who is in
        body["desired"] = dict(backend.autoscaler.desired)
        body["services"] = sorted(
            s.id for r in ("prefill", "decode") for s in backend.registry.pool(r)
        )
    return backend.healthy, body


def refresh_gauges(backend: Backend, sessions: LiveSessions) -> None:
    for role in ("prefill", "decode"):
        M.SERVICES.labels(role).set(len(backend.registry.pool(role)))
    M.SESSIONS.set(sessions.count())


async def feed_probe(probe: Probe, backend: Backend, sessions: LiveSessions) -> None:
    """The probe port (`--http-port`: /health and /metrics without the API key, for a scraper
    on an internal network) answers from its own threads, so it reads what this task, on the
    loop, leaves it: never the registry while the loop changes it."""
    snapshot = health_body(backend)
    probe.status = lambda: snapshot  # the latest: the name is rebound below
    while True:
        refresh_gauges(backend, sessions)
        snapshot = health_body(backend)
        await asyncio.sleep(PROBE_REFRESH_S)


async def health(gw: Serving) -> JSONResponse:
    ok, body = health_body(gw.backend)
    return JSONResponse(body, 200 if ok else 503)


async def metrics(gw: Serving, request: Request) -> Response:
    refresh_gauges(gw.backend, request.app.state.sessions)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def models(gw: Serving) -> ModelList:
    return gw.models()


def cache_scope(req: CompletionRequest | ChatRequest, request: Request) -> CacheScope:
    """Whose cached prefixes this request shares and how long its KV stays cached after it
    (gateway.sessions); its session counts as live. (And whether it may ask for a priority.)"""
    check_priority(req, request.app.state.config.allow_priority)
    session, ttl_s = session_ttl(request.headers, req.user, request.app.state.config)
    request.app.state.sessions.seen(session, ttl_s)
    return CacheScope(ttl_s, cache_salt(getattr(request.state, "tenant", None), req.cache_salt))


async def answered(request: Request, work: Awaitable[Response]) -> Response:
    """The response, unless the client leaves first: then the work is cancelled, and with it
    its request on the services (a non-streamed answer would otherwise run to max_tokens for
    nobody, and the openai client's retries would triple it). A stream's response returns at
    once and watches its client itself."""
    task = asyncio.ensure_future(work)

    async def left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # this handler cancelled too (the server stopping): neither outlives it
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nobody is there to read it
    return task.result()


async def completions(req: CompletionRequest, gw: Serving, request: Request) -> Response:
    return await answered(request, gw.completions(req, cache_scope(req, request)))


async def chat(req: ChatRequest, gw: Serving, request: Request) -> Response:
    return await answered(request, gw.chat(req, cache_scope(req, request)))


def create_app(model_dir: Path, config: BatonConfig, probe: Probe | None = None) -> FastAPI:
    """The gateway for `model_dir`'s tokenizer; services connect to config.gateway.zmq_addr.
    `probe`: a port that serves /health and /metrics without the API key (feed_probe)."""
    gw = config.gateway

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router = Router(
            local_prefill_tokens=gw.local_prefill_tokens,
            busy_prefill_tokens=gw.busy_prefill_tokens,
            cached_prefill_tokens=gw.cached_prefill_tokens,
            block_size=config.engine_for("decode").block_size,
            service_timeout_s=gw.service_timeout_s,
            tpot_s=config.slo.tpot_ms / 1000,
        )
        # `baton up --autoscale` may move every prefill's CPUs to decodes
        aggregated = config.prefill.count == 0 or config.autoscale.max_services > 0
        keys = Keys(config.key_dir) if config.key_dir else None
        admission, autoscaler = Admission(gw, config.slo), Autoscaler(config.slo, config.autoscale)
        backend = Backend(gw.zmq_addr, admission, router, aggregated, keys, autoscaler)
        backend.on_heartbeat = M.observe_heartbeat
        backend.start()
        app.state.gateway = Gateway(
            model_dir,
            backend,
            gw.model_name or model_dir.name,
            config.engine.max_model_len,
            gw.max_migrations,
            gw.request_timeout_s,
            gw.resume_wait_s,
            load_template(gw.chat_template),
            gw.tool_call_parser,
            gw.max_n,
            gw.reasoning_parser,
        )
        log.info("gateway listening for services on %s", backend.addr)
        fed = probe and asyncio.create_task(feed_probe(probe, backend, app.state.sessions))
        yield
        if fed:
            fed.cancel()
        await backend.close()

    app = FastAPI(title="Baton", version="0.1.0", lifespan=lifespan, exception_handlers=HANDLERS)
    app.state.config = gw
    app.state.sessions = LiveSessions()
    app.add_middleware(BodyLimit)
    app.add_middleware(WriteTimeout, timeout_s=gw.write_timeout_s)
    if keys := api_keys(gw):  # outermost: a request without a key gets no further
        app.add_middleware(ApiKey, keys=keys, per_tenant=gw.cache_per_api_key)
    app.add_api_route("/health", health)
    app.add_api_route("/metrics", metrics, response_class=PlainTextResponse)
    app.add_api_route("/v1/models", models, responses={401: ERRORS[401]})
    for path, endpoint, model in (
        ("/v1/completions", completions, CompletionResponse),
        ("/v1/chat/completions", chat, ChatCompletionResponse),
    ):
        app.add_api_route(
            path, endpoint, methods=["POST"], response_model=model, responses=GENERATION_RESPONSES
        )
    return app
