"""Serving OpenAI requests: tokenize, check, admit, drive each choice's token stream (with
failover), detokenize, and hand the pieces to their response shape (shapes.py)."""

import asyncio
import functools
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.responses import JSONResponse, Response, StreamingResponse
from msgspec.structs import replace
from transformers import AutoTokenizer

from baton.gateway import metrics as M
from baton.gateway.admission import Admitted
from baton.gateway.backend import Backend, ServiceFailed, Stream
from baton.gateway.openai_types import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    ModelNotFound,
    error_response,
)
from baton.gateway.params import check_tools, flatten, nth, sampling_params
from baton.gateway.router import NoCapacity, Placement, Why
from baton.gateway.sessions import CacheScope
from baton.gateway.shapes import (
    ChatShape,
    ClosingStream,
    CompletionShape,
    Piece,
    Shape,
    json_response,
    merged,
    unavailable,
)
from baton.gateway.tools import FORMATS
from baton.sampling_params import SamplingParams
from baton.text import IncrementalDetokenizer, StopStringMatcher, final_text

log = logging.getLogger("baton.gateway")

SHARED = CacheScope()  # no session, no salt: the prefix cache shared by all
# a token is rarely longer than this: text of more characters per context token cannot fit,
# and is refused before it is tokenized (an 8 MB prompt took the tokenizer 7 s)
MAX_CHARS_PER_TOKEN = 16


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
        resume_wait_s: float,
        chat_template: str | None = None,
        tool_parser: str | None = None,
        max_n: int = 1,
        reasoning_parser: str | None = None,
    ):
        """chat_template: Jinja text, None for the tokenizer's; tool_parser: how tool calls
        are read from the text (gateway.tools), None where they are not."""
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.chat_template = chat_template or self.tokenizer.chat_template or ""
        self.tool_format = FORMATS[tool_parser] if tool_parser else None
        self.max_n = max_n
        self.reasoning_parser = reasoning_parser
        self.backend = backend
        self.model_name = model_name
        self.max_migrations, self.resume_wait_s = max_migrations, resume_wait_s
        self.request_timeout_s = request_timeout_s
        config = json.loads((model_dir / "config.json").read_text())
        self.max_model_len = max_model_len or config.get("max_position_embeddings", 1 << 30)
        self.vocab_size = config.get("vocab_size") or len(self.tokenizer)
        self.tokenizing = asyncio.Lock()

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name)])

    async def completions(self, req: CompletionRequest, cache: CacheScope = SHARED) -> Response:
        self.check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            prompts = [await self.tokenize(len(p), "prompt", self.tokenizer.encode, p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [await self.tokenize(len(x), "prompt", self.tokenizer.encode, x) for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise BadRequest("prompt must be a string, a list of strings, or token ids", "prompt")
        if req.echo and req.logprobs is not None:
            raise BadRequest("echo with logprobs (the prompt's) is not supported", "echo")
        params = sampling_params(
            req, req.max_tokens, req.logprobs, self.max_model_len, self.vocab_size,
            self.tool_format, cache,
        )  # fmt: skip
        echoes = None  # echo: each choice's text starts with its prompt's
        if req.echo:
            texts = [p] if isinstance(p, str) else p if isinstance(p[0], str) else None
            echoes = [e for e in texts or map(self.tokenizer.decode, prompts) for _ in range(req.n)]
        return await self.run(
            prompts,
            params,
            req.stream,
            CompletionShape(self.tokenizer, self.model_name, req, echoes),
            req.max_tokens is None,
            req.n,
        )

    async def chat(self, req: ChatRequest, cache: CacheScope = SHARED) -> Response:
        self.check_model(req.model)
        check_tools(req, self.chat_template, self.tool_format)
        messages = [flatten(i, m.model_dump(exclude_none=True)) for i, m in enumerate(req.messages)]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        chars = sum(len(str(m.get("content", ""))) for m in messages) + len(str(tools or ""))
        try:
            ids = await self.tokenize(
                chars, "messages", self.tokenizer.apply_chat_template, messages, tools=tools,
                chat_template=self.chat_template, add_generation_prompt=True, tokenize=True,
                return_dict=True,
            )  # fmt: skip
            ids = ids["input_ids"]
        except BadRequest:
            raise
        except Exception as e:  # a template that rejects the conversation
            raise BadRequest(f"chat template failed: {e}") from e
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = sampling_params(
            req, max_tokens, logprobs, self.max_model_len, self.vocab_size, self.tool_format,
            cache,
        )  # fmt: skip
        # the answer may hold calls, written as the parser reads them
        calls = self.tool_format if req.tools and req.tool_choice != "none" else None
        thinks = self.reasoning_parser is not None
        shape = ChatShape(self.tokenizer, self.model_name, req, calls, thinks)
        return await self.run([list(ids)], params, req.stream, shape, max_tokens is None, req.n)

    async def tokenize(self, chars: int, param: str, fn, *args, **kwargs):
        """Tokenize beside the event loop, one at a time (a fast tokenizer is not safe to
        share between threads), so other streams never wait on it; text too long to fit the
        context whatever its tokens is refused before the tokenizer spends seconds on it."""
        if chars > (most := self.max_model_len * MAX_CHARS_PER_TOKEN):
            raise BadRequest(
                f"{param} has {chars} characters; at most {most} can fit this model's "
                f"context of {self.max_model_len} tokens", param,
            )  # fmt: skip
        async with self.tokenizing:
            return await asyncio.to_thread(fn, *args, **kwargs)

    def context_tokens(self) -> int:
        """The most tokens one request may hold: the model's context, or less where a decode's
        whole KV pool holds fewer (such a request could never run there)."""
        decodes = self.backend.registry.pool("decode")
        pools = [d.load.total_blocks * self.backend.router.block_size for d in decodes]
        return min([self.max_model_len, *pools])

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server has {self.model_name!r}"
            )

    def check_prompt(
        self, ids: list[int], max_tokens: int, stop_token_ids: tuple[int, ...], limit: int
    ) -> None:
        """`limit`: context_tokens(), so that a request no decode's pool could hold is a 400
        here, not a failure from the service after its prompt was computed (L7)."""
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise BadRequest(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        if any(not 0 <= t < self.vocab_size for t in stop_token_ids):
            raise BadRequest(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")
        context = (
            f"this model's context is {limit}"
            if limit == self.max_model_len
            else f"a decode's KV pool holds {limit}"
        )
        if len(ids) >= limit:
            raise BadRequest(f"the prompt has {len(ids)} tokens; {context}")
        if len(ids) + max_tokens > limit:
            raise BadRequest(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is more than "
                f"the {limit} tokens a request may hold: {context}",
                "max_tokens",
            )

    async def run(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stream: bool,
        shape: Shape,
        rest_of_context: bool,
        n: int = 1,
    ) -> Response:
        """Drive the choices (`n` of each prompt: choice k * n + j is prompt k's j-th) and
        shape the output as a JSON body or an SSE stream. With `rest_of_context` (no
        max_tokens given) each choice may take the rest of the context, as in vLLM."""
        if n > self.max_n:
            raise BadRequest(f"n is {n}; at most {self.max_n} here ([gateway] max_n)", "n")
        limit = self.context_tokens()
        each = [
            replace(params, max_tokens=max(limit - len(ids), 1)) if rest_of_context else params
            for ids in prompts
        ]
        for ids, p in zip(prompts, each, strict=True):
            self.check_prompt(ids, p.max_tokens, p.stop_token_ids, limit)
        try:
            admitted = self.backend.admit(
                prompts, params.cache_salt
            )  # a 429 comes now, before any response
        except NoCapacity as e:  # no decode: a 503, but a stream's client reads events
            if not stream:
                raise
            M.REQUESTS.labels("503").inc()
            return StreamingResponse(unavailable(e), media_type="text/event-stream")
        start = time.perf_counter()
        gens = []
        for k, (ids, p, placement) in enumerate(
            zip(prompts, each, admitted.placements, strict=True)
        ):
            lead = asyncio.get_running_loop().create_future()  # where the first one decodes
            gens.append(self.choice(k * n, ids, p, placement, lead))
            gens += [self.sibling(k * n + j, ids, nth(p, j), lead) for j in range(1, n)]
        prompt_tokens = sum(map(len, prompts))
        pieces = self.measured(merged(gens), admitted, start, prompt_tokens)
        release = functools.partial(self.backend.release, admitted)
        if stream:
            body = shape.sse(pieces, prompt_tokens)
            return ClosingStream(body, release, media_type="text/event-stream")
        try:
            return json_response(await shape.body(pieces, prompt_tokens, len(gens)))
        except ServiceFailed as e:
            return JSONResponse(error_response(str(e), "server_error", 500).model_dump(), 500)
        finally:  # also when cancelled before the pieces started (their cleanup never runs)
            release()

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
        except (asyncio.CancelledError, GeneratorExit):  # the client left, or was dropped
            status = "499"
            raise
        finally:
            await pieces.aclose()  # the choices end (and their requests with them) now
            self.backend.release(admitted)
            M.INFLIGHT.dec()
            M.GENERATION_TOKENS.inc(count)
            M.REQUESTS.labels(status).inc()
            if first is not None:
                M.E2E.observe(time.perf_counter() - start)
                tpot = (last - first) / (count - 1) if count > 1 else None
                if tpot is not None:
                    M.TPOT.observe(tpot)
                self.backend.autoscaler.served(first - start, tpot)

    async def choice(
        self,
        index: int,
        ids: list[int],
        params: SamplingParams,
        placement: Placement,
        decoding: asyncio.Future | None = None,
    ) -> AsyncIterator[Piece]:
        """One choice's pieces; `decoding` gets the id of the decode that takes its first
        token after the prompt's (the prompt's KV is there then), or None where none does."""
        stream = await self.backend.submit(placement, ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, ids)
        stops = StopStringMatcher(params.stop)
        streamed: list[int] = []
        deadline = time.monotonic() + self.request_timeout_s
        try:
            for migrations in itertools.count():
                try:
                    async for token in stream.tokens(deadline):
                        if decoding is not None and token.index and not decoding.done():
                            decoding.set_result(stream.decode_id)
                        streamed.append(token.token_id)
                        text, stopped = stops.feed(detok.add(token.token_id))
                        reason = token.finish_reason  # an IntEnum whose STOP is 0: not truthy
                        finish = (
                            "stop" if stopped else reason.openai if reason is not None else None
                        )
                        if finish and not stopped:  # what the detokenizer held back too (L8)
                            text += final_text(detok, stops)
                        yield Piece(index, text, token, finish)
                        if finish:
                            return
                except ServiceFailed as e:
                    if not e.retryable or migrations >= self.max_migrations:
                        raise
                    stream = await self.resume(stream, ids, streamed, params, e)
        finally:
            if decoding is not None and not decoding.done():
                decoding.set_result(None)
            # aborts it on the services unless it ended; a decode that produced tokens of it
            # now caches its KV (token 0 comes from the prefill)
            await self.backend.finish(stream, ids + streamed if len(streamed) > 1 else None)

    async def sibling(
        self, index: int, ids: list[int], params: SamplingParams, lead: asyncio.Future
    ) -> AsyncIterator[Piece]:
        """A prompt's choice after its first: once the first decodes, its decode holds the
        prompt's KV (published for prefix hits), so this one prefills there, computing only the
        last partial block: the prompt is computed and handed off once for all n choices."""
        decode_id = await lead
        decode = self.backend.registry.services.get(decode_id) if decode_id else None
        if decode is not None and self.backend.registry.live(decode):
            placement = Placement(decode, None, Why.CACHED, len(ids))
            self.backend.router.reserve([placement])
        else:  # the first failed or ended before decoding: placed on its own
            placement = self.backend.place(ids, set(), params.cache_salt)
        async for piece in self.choice(index, ids, params, placement):
            yield piece

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
        deadline = time.monotonic() + self.resume_wait_s
        while True:
            try:
                placement = self.backend.place(ids + streamed, avoid, params.cache_salt)
                break
            except NoCapacity as e:  # e.g. the only decode is restarting: wait a little
                if time.monotonic() > deadline:
                    raise ServiceFailed(f"{why}; no capacity left to resume it: {e}") from e
                await asyncio.sleep(0.2)
        stream = await self.backend.submit(placement, ids + streamed, params, len(ids))
        M.MIGRATIONS.inc()
        log.warning("resumed a request after %d tokens: %s", len(streamed), why)
        return stream
