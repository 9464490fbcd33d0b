"""Serving OpenAI requests: tokenize, check, admit, drive each choice's token stream (with
failover), detokenize, and hand the pieces to their response shape (shapes.py)."""

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import AutoTokenizer

from baton.gateway import metrics as M
from baton.gateway.admission import Admitted
from baton.gateway.backend import Backend, ServiceFailed, Stream
from baton.gateway.openai_types import (
    ChatRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_response,
)
from baton.gateway.router import NoCapacity, Placement
from baton.gateway.shapes import (
    ChatShape,
    CompletionShape,
    Piece,
    Shape,
    json_response,
    unavailable,
)
from baton.sampling_params import SamplingParams
from baton.text import IncrementalDetokenizer, StopStringMatcher

log = logging.getLogger("baton.gateway")

RESUME_WAIT_S = 10.0  # how long a stream to resume waits for a live decode


class BadRequest(ValueError):
    pass


class ModelNotFound(LookupError):
    pass


class Gateway:
    """One model served over the backend's services (vLLM's OpenAIServing* classes)."""

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

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name)])

    async def completions(self, req: CompletionRequest) -> Response:
        self.check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            prompts = [self.tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [self.tokenizer.encode(x) for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise BadRequest("prompt must be a string, a list of strings, or token ids")
        params = self.sampling(req, req.max_tokens, req.logprobs)
        return await self.run(
            prompts, params, req.stream, CompletionShape(self.tokenizer, self.model_name, req)
        )

    async def chat(self, req: ChatRequest) -> Response:
        self.check_model(req.model)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        except Exception as e:  # a template that rejects the conversation
            raise BadRequest(f"chat template failed: {e}") from e
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, req.max_completion_tokens or req.max_tokens, logprobs)
        return await self.run(
            [list(ids)], params, req.stream, ChatShape(self.tokenizer, self.model_name, req)
        )

    def sampling(
        self, req: CompletionRequest | ChatRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
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

    async def run(
        self, prompts: list[list[int]], params: SamplingParams, stream: bool, shape: Shape
    ) -> Response:
        """Drive the choices and shape the output as a JSON body or an SSE stream."""
        for ids in prompts:
            self.check_prompt(ids, params.max_tokens, params.stop_token_ids)
        try:
            admitted = self.backend.admit(prompts)  # a 429 comes now, before any response
        except NoCapacity as e:  # no decode: a 503, but a stream's client reads events
            if not stream:
                raise
            M.REQUESTS.labels("503").inc()
            return StreamingResponse(unavailable(e), media_type="text/event-stream")
        start = time.perf_counter()
        gens = [
            self.choice(i, ids, params, placement)
            for i, (ids, placement) in enumerate(zip(prompts, admitted.placements, strict=True))
        ]
        prompt_tokens = sum(map(len, prompts))
        pieces = self.measured(merged(gens), admitted, start, prompt_tokens)
        if stream:
            body = shape.sse(pieces, prompt_tokens)
            return StreamingResponse(body, media_type="text/event-stream")
        try:
            return json_response(await shape.body(pieces, prompt_tokens, len(prompts)))
        except ServiceFailed as e:
            return JSONResponse(error_response(str(e), "server_error", 500).model_dump(), 500)

    async def measured(
        self, pieces: AsyncIterator[Piece], admitted: Admitted, start: float, prompt_tokens: int
    ) -> AsyncIterator[Piece]:
        """`pieces`, timed from `start` (admission) into the metrics and the admission's
        calibration, and counted by outcome."""
        first = last = None
        count = 0
        M.INFLIGHT.inc()
        M.PROMPT_TOKENS.inc(prompt_tokens)
        status = "200"
        try:
            async for p in pieces:
                t = time.perf_counter()
                if first is None:
                    first = t
                    self.backend.admission.observe(admitted, t - start)
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

    async def choice(
        self, index: int, ids: list[int], params: SamplingParams, placement: Placement
    ) -> AsyncIterator[Piece]:
        stream = await self.backend.submit(placement, ids, params)
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
                        reason = token.finish_reason  # an IntEnum whose STOP is 0: not truthy
                        finish = (
                            "stop" if stopped else reason.openai if reason is not None else None
                        )
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
        self,
        old: Stream,
        ids: list[int],
        streamed: list[int],
        params: SamplingParams,
        why: ServiceFailed,
    ) -> Stream:
        """Failover: the prompt plus the tokens the client already has go to live services,
        which prefill them and continue from the next token; the client sees one stream."""
        await self.backend.finish(old)  # frees whatever the surviving service still holds
        avoid = {old.prefill_id, old.decode_id}  # one of them failed it
        deadline = time.monotonic() + RESUME_WAIT_S
        while True:
            try:
                placement = self.backend.place(ids + streamed, avoid)
                break
            except NoCapacity as e:  # e.g. the only decode is restarting: wait a little
                if time.monotonic() > deadline:
                    raise ServiceFailed(f"{why}; no capacity left to resume it: {e}") from e
                await asyncio.sleep(0.2)
        stream = await self.backend.submit(placement, ids + streamed, params, len(ids))
        M.MIGRATIONS.inc()
        log.warning("resumed a request after %d tokens: %s", len(streamed), why)
        return stream


async def merged(gens: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Pieces of several choices as they come; errors propagate; all cancelled on exit."""
    if len(gens) == 1:
        async for p in gens[0]:
            yield p
        return
    queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()

    async def pump(gen: AsyncIterator[Piece]) -> None:
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
