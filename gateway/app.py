"""The HTTP edge: OpenAI-compatible completions and chat (SSE streaming or not), models,
health and metrics. Tokenizes and detokenizes here; never imports torch or the model."""

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from transformers import AutoTokenizer

from baton import protocol as P
from baton.config import BatonConfig
from baton.gateway import metrics as M
from baton.gateway.admission import Admission, Overloaded
from baton.gateway.backend import Backend, NoCapacity, ServiceFailed, Stream
from baton.gateway.limits import BodyLimit
from baton.gateway.openai_types import (
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    Usage,
    error_body,
    now,
)
from baton.sampling_params import SamplingParams
from baton.text import IncrementalDetokenizer, StopStringMatcher

log = logging.getLogger("baton.gateway")

# what the generation routes answer, for the OpenAPI schema (/docs): JSON, SSE when streaming
GENERATION_RESPONSES: dict[int | str, dict] = {
    200: {"content": {"text/event-stream": {}}},
    **{code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)},
}


RESUME_WAIT_S = 10.0  # how long a stream to resume waits for a live decode


class BadRequest(ValueError):
    pass


class ModelNotFound(LookupError):
    pass


@dataclass
class Piece:
    """One step of one choice: new text, the token behind it, and the finish reason if any."""

    index: int
    text: str
    token: P.TokenOutput
    finish_reason: str | None


class Gateway:
    def __init__(
        self,
        model_dir: Path,
        backend: Backend,
        model_name: str,
        max_model_len: int | None,
        max_migrations: int,
        request_timeout_s: float,
    ):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.backend = backend
        self.model_name = model_name
        self.max_migrations = max_migrations
        self.request_timeout_s = request_timeout_s
        config = json.loads((model_dir / "config.json").read_text())
        self.max_model_len = max_model_len or config.get("max_position_embeddings", 1 << 30)
        self.vocab_size = config.get("vocab_size") or len(self.tokenizer)

    def sampling(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if max_tokens is not None and max_tokens > self.max_model_len:
            raise BadRequest(
                f"max_tokens is {max_tokens}; this model's context is {self.max_model_len}"
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens or 16,
                min_tokens=req.min_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k if req.top_k and req.top_k > 0 else None,
                min_p=req.min_p,
                seed=req.seed,
                stop=tuple(stop),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                priority=req.priority,
            )
        except ValueError as e:
            raise BadRequest(str(e)) from e

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server has {self.model_name!r}"
            )

    def check_prompt(
        self, ids: list[int], max_tokens: int, stop_token_ids: tuple[int, ...] = ()
    ) -> None:
        if not ids:
            raise BadRequest("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise BadRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in stop_token_ids):
            raise BadRequest(f"stop_token_ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len}"
            )
        if len(ids) + max_tokens > self.max_model_len:
            raise BadRequest(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this "
                f"model's context of {self.max_model_len} tokens"
            )

    async def choice(
        self, index: int, ids: list[int], params: SamplingParams, prefill_id: str | None
    ) -> AsyncIterator[Piece]:
        stream = await self.backend.submit(ids, params, prefill_id)
        detok = IncrementalDetokenizer(self.tokenizer, ids)
        stops = StopStringMatcher(params.stop)
        streamed: list[int] = []
        deadline = time.monotonic() + self.request_timeout_s
        try:
            for migrations in itertools.count():
                try:
                    async for token in stream.tokens(deadline):
                        streamed.append(token.token_id)
                        text, stopped = stops.feed(detok.add(token.token_id))
                        finish = "stop" if stopped else token.finish_reason
                        if finish and not stopped:
                            text += stops.flush()
                        yield Piece(index, text, token, finish)
                        if finish:
                            return
                except ServiceFailed as e:
                    if not e.retryable or migrations >= self.max_migrations:
                        raise
                    stream = await self.resume(stream, ids, streamed, params, e)
        finally:
            # aborts it on the services unless it ended; a decode that produced tokens of it
            # now caches its KV (token 0 comes from the prefill)
            await self.backend.finish(stream, ids + streamed if len(streamed) > 1 else None)

    async def resume(
        self, old: Stream, ids: list[int], streamed: list[int], params: SamplingParams, why
    ) -> Stream:
        """Failover: the prompt plus the tokens the client already has go to live services,
        which prefill them and continue from the next token; the client sees one stream."""
        await self.backend.finish(old)  # frees whatever the surviving service still holds
        avoid = {old.prefill_id, old.decode_id}  # one of them failed it
        deadline = time.monotonic() + RESUME_WAIT_S
        while True:
            try:
                stream = await self.backend.submit(ids + streamed, params, None, len(ids), avoid)
                break
            except NoCapacity as e:  # e.g. the only decode is restarting: wait a little
                if time.monotonic() > deadline:
                    raise ServiceFailed(f"{why}; no capacity left to resume it: {e}") from e
                await asyncio.sleep(0.2)
        M.MIGRATIONS.inc()
        log.warning("resumed a request after %d tokens: %s", len(streamed), why)
        return stream


async def merged(gens: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Pieces of several choices as they come; errors propagate; all cancelled on exit."""
    if len(gens) == 1:
        async for p in gens[0]:
            yield p
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen):
        try:
            async for p in gen:
                await queue.put(p)
            await queue.put(None)
        except Exception as e:  # surfaced to the consumer below
            await queue.put(e)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _logprobs_entry(tokenizer, t: P.TokenOutput) -> dict:
    tok = lambda i: tokenizer.convert_ids_to_tokens(i)  # noqa: E731
    return {
        "token": tok(t.token_id),
        "logprob": t.logprob,
        "top": [(tok(i), lp) for i, lp in t.top_logprobs or []],
    }


def create_app(model_dir: Path, config: BatonConfig) -> FastAPI:
    """The gateway for `model_dir`'s tokenizer; services connect to config.gateway.zmq_addr."""
    state: dict = {}
    api_key = config.gateway.api_key
    model_name = config.gateway.model_name or model_dir.name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw = config.gateway
        aggregated = config.prefill.count == 0
        admission = Admission(gw, config.slo)
        backend = Backend(
            gw.zmq_addr,
            admission,
            gw.local_prefill_tokens,
            aggregated,
            gw.busy_prefill_tokens,
            cached_prefill_tokens=gw.cached_prefill_tokens,
            block_size=config.engine_for("decode").block_size,
        )
        backend.on_heartbeat = M.observe_heartbeat
        backend.start()
        state["gw"] = Gateway(
            model_dir,
            backend,
            model_name,
            config.engine.max_model_len,
            gw.max_migrations,
            gw.request_timeout_s,
        )
        log.info("gateway listening for services on %s", backend.addr)
        yield
        await backend.close()

    app = FastAPI(title="Baton", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                body = error_body("invalid or missing API key", "authentication_error", 401)
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """404, 405 and 413 in the OpenAI error shape too."""
        body = error_body(str(exc.detail), "invalid_request_error", exc.status_code)
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else "invalid request"
        M.REQUESTS.labels("400").inc()
        return JSONResponse(error_body(message, "invalid_request_error", 400, param), 400)

    @app.exception_handler(ModelNotFound)
    async def not_found(request: Request, exc: ModelNotFound):
        M.REQUESTS.labels("404").inc()
        return JSONResponse(error_body(str(exc), "invalid_request_error", 404, "model"), 404)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        M.REQUESTS.labels("400").inc()
        return JSONResponse(error_body(str(exc), "invalid_request_error", 400), 400)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        M.REQUESTS.labels("429").inc()
        body = error_body(str(exc), "rate_limit_exceeded", 429)
        return JSONResponse(body, 429, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(NoCapacity)
    async def busy(request: Request, exc: NoCapacity):
        M.REQUESTS.labels("503").inc()
        return JSONResponse(error_body(str(exc), "service_unavailable", 503), 503)

    @app.get("/health")
    async def health():
        backend = state["gw"].backend
        pools = {r: len(backend.registry.pool(r)) for r in ("prefill", "decode")}
        return JSONResponse({"healthy": backend.healthy, **pools}, 200 if backend.healthy else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        for role in ("prefill", "decode"):
            M.SERVICES.labels(role).set(len(state["gw"].backend.registry.pool(role)))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": now(), "owned_by": "baton"}],
        }

    async def run(
        gw: Gateway, prompts: list[list[int]], params: SamplingParams, stream: bool, shape
    ):
        """Drive the choices and shape the output as a JSON body or an SSE stream."""
        for ids in prompts:
            gw.check_prompt(ids, params.max_tokens, params.stop_token_ids)
        admitted = gw.backend.admit(prompts)  # a 429 comes now, before any response starts
        prefills = admitted.prefills
        start = time.perf_counter()
        gens = [
            gw.choice(i, ids, params, p)
            for i, (ids, p) in enumerate(zip(prompts, prefills, strict=True))
        ]
        prompt_tokens = sum(map(len, prompts))

        async def pieces() -> AsyncIterator[Piece]:
            first = last = None
            count = 0
            M.INFLIGHT.inc()
            M.PROMPT_TOKENS.inc(prompt_tokens)
            status = "200"
            try:
                async for p in merged(gens):
                    t = time.perf_counter()
                    if first is None:
                        first = t
                        gw.backend.admission.observe(admitted, t - start)
                        M.TTFT.observe(t - start)
                    last, count = t, count + 1
                    yield p
            except ServiceFailed:
                status = "500"
                raise
            except asyncio.CancelledError:
                status = "499"
                raise
            finally:
                M.INFLIGHT.dec()
                M.GENERATION_TOKENS.inc(count)
                M.REQUESTS.labels(status).inc()
                if first is not None:
                    M.E2E.observe(time.perf_counter() - start)
                    if count > 1:
                        M.TPOT.observe((last - first) / (count - 1))

        if stream:
            return StreamingResponse(
                shape.sse(pieces(), prompt_tokens), media_type="text/event-stream"
            )
        try:
            return await shape.body(pieces(), prompt_tokens, len(prompts))
        except ServiceFailed as e:
            return JSONResponse(error_body(str(e), "server_error", 500), 500)

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(req: CompletionRequest):
        gw: Gateway = state["gw"]
        gw.check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            prompts = [gw.tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [gw.tokenizer.encode(x) for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise BadRequest("prompt must be a string, a list of strings, or token ids")
        params = gw.sampling(req, req.max_tokens, req.logprobs)
        return await run(gw, prompts, params, req.stream, CompletionShape(gw, req))

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat(req: ChatRequest):
        gw: Gateway = state["gw"]
        gw.check_model(req.model)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            ids = gw.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        except Exception as e:  # a template that rejects the conversation
            raise BadRequest(f"chat template failed: {e}") from e
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = gw.sampling(req, req.max_completion_tokens or req.max_tokens, logprobs)
        return await run(gw, [list(ids)], params, req.stream, ChatShape(gw, req))

    return app


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Shape:
    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, gw: Gateway, req):
        self.gw, self.req = gw, req
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = now()

    def head(self, name: str) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.gw.model_name}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ).model_dump()

    async def sse(self, pieces: AsyncIterator[Piece], prompt_tokens: int) -> AsyncIterator[str]:
        count = 0
        try:
            async for p in pieces:
                count += 1
                choice = self.with_ids(self.chunk_choice(p), [p.token])
                yield sse({**self.head(self.chunk_name), "choices": [choice]})
        except ServiceFailed as e:
            yield sse(error_body(str(e), "server_error", 500))
            return
        except NoCapacity as e:  # a pool emptied after the response started
            yield sse(error_body(str(e), "service_unavailable", 503))
            return
        opts = self.req.stream_options
        if opts is not None and opts.include_usage:
            yield sse(
                {
                    **self.head(self.chunk_name),
                    "choices": [],
                    "usage": self.usage(prompt_tokens, count),
                }
            )
        yield "data: [DONE]\n\n"

    def with_ids(self, choice: dict, toks: list[P.TokenOutput]) -> dict:
        if self.req.return_token_ids:
            choice["token_ids"] = [t.token_id for t in toks]
        return choice

    async def body(self, pieces: AsyncIterator[Piece], prompt_tokens: int, n: int) -> dict:
        texts = [""] * n
        finish: list[str | None] = [None] * n
        tokens: list[list[P.TokenOutput]] = [[] for _ in range(n)]
        async for p in pieces:
            texts[p.index] += p.text
            tokens[p.index].append(p.token)
            finish[p.index] = p.finish_reason or finish[p.index]
        completion = sum(map(len, tokens))
        choices = [
            self.with_ids(self.final_choice(i, texts[i], tokens[i], finish[i]), tokens[i])
            for i in range(n)
        ]
        return {
            **self.head(self.object_name),
            "choices": choices,
            "usage": self.usage(prompt_tokens, completion),
        }


class CompletionShape(_Shape):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def logprobs(self, toks: list[P.TokenOutput]) -> dict | None:
        if self.req.logprobs is None:
            return None
        entries = [_logprobs_entry(self.gw.tokenizer, t) for t in toks]
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries],
        }

    def chunk_choice(self, p: Piece) -> dict:
        return {
            "index": p.index,
            "text": p.text,
            "logprobs": self.logprobs([p.token]),
            "finish_reason": p.finish_reason,
        }

    def final_choice(self, i, text, toks, finish) -> dict:
        return {"index": i, "text": text, "logprobs": self.logprobs(toks), "finish_reason": finish}


class ChatShape(_Shape):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def logprobs(self, toks: list[P.TokenOutput]) -> dict | None:
        if not self.req.logprobs:
            return None
        content = []
        for t in toks:
            e = _logprobs_entry(self.gw.tokenizer, t)
            top = [{"token": tok, "logprob": lp} for tok, lp in e["top"]]
            content.append({"token": e["token"], "logprob": e["logprob"], "top_logprobs": top})
        return {"content": content}

    def chunk_choice(self, p: Piece) -> dict:
        delta = (
            {"role": "assistant", "content": p.text} if p.token.index == 0 else {"content": p.text}
        )
        return {
            "index": p.index,
            "delta": delta,
            "logprobs": self.logprobs([p.token]),
            "finish_reason": p.finish_reason,
        }

    def final_choice(self, i, text, toks, finish) -> dict:
        message = {"role": "assistant", "content": text}
        return {
            "index": i,
            "message": message,
            "logprobs": self.logprobs(toks),
            "finish_reason": finish,
        }
