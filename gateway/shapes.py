"""The OpenAI response shapes: the pieces of a request's choices become response models
(openai_types.py), as one JSON body or as server-sent events; the choices' pieces merged
into one iterator, and a streamed response that closes them however it ends."""

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from baton import protocol as P
from baton.gateway.backend import ServiceFailed
from baton.gateway.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatRequest,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    TokenDetails,
    TopLogprob,
    Usage,
    error_response,
    now,
)
from baton.gateway.reasoning import ReasoningStream, split
from baton.gateway.router import NoCapacity
from baton.gateway.tools import Format, ToolStream, parse


@dataclass
class Piece:
    """One step of one choice: new text, the token behind it, and the finish reason if any."""

    index: int
    text: str
    token: P.TokenOutput
    finish_reason: str | None


def json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"


async def unavailable(e: NoCapacity) -> AsyncIterator[str]:
    """A stream that ends for want of a service, before or after it started: one error event."""
    yield sse(error_response(str(e), "service_unavailable", 503))


class Shape(ABC):
    """One response's id, and how its pieces become the OpenAI response models."""

    id_prefix: str
    response_model: type[CompletionResponse | ChatCompletionResponse]
    chunk_model: type[CompletionStreamResponse | ChatCompletionStreamResponse]

    def __init__(self, tokenizer: Tokenizer, model_name: str, req: CompletionRequest | ChatRequest):
        self.tokenizer, self.model_name, self.req = tokenizer, model_name, req
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = now()

    @abstractmethod
    def choice(
        self, index: int, texts: list[str], toks: list[P.TokenOutput], finish: str | None
    ) -> CompletionChoice | ChatChoice:
        """One choice of the whole response, from its pieces' texts."""

    @abstractmethod
    def chunk_choice(self, p: Piece) -> CompletionChoice | ChatStreamChoice:
        """One choice of a stream chunk: one piece of it."""

    def head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model_name}

    def token_ids(self, toks: list[P.TokenOutput]) -> list[int] | None:
        return [t.token_id for t in toks] if self.req.return_token_ids else None

    def token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id)

    async def sse(self, pieces: AsyncIterator[Piece], prompt_tokens: int) -> AsyncIterator[str]:
        count = 0
        try:
            async for p in pieces:
                count += 1
                yield sse(self.chunk_model(**self.head(), choices=[self.chunk_choice(p)]))
        except ServiceFailed as e:
            yield sse(error_response(str(e), "server_error", 500))
            return
        except NoCapacity as e:  # a pool emptied after the response started
            async for event in unavailable(e):
                yield event
            return
        finally:
            await pieces.aclose()  # closed here too when the response is (ClosingStream)
        opts = self.req.stream_options
        if opts is not None and opts.include_usage:
            yield sse(
                self.chunk_model(**self.head(), choices=[], usage=self.usage(prompt_tokens, count))
            )
        yield "data: [DONE]\n\n"

    async def body(self, pieces: AsyncIterator[Piece], prompt_tokens: int, n: int) -> BaseModel:
        texts: list[list[str]] = [[] for _ in range(n)]  # each choice's pieces' texts
        finish: list[str | None] = [None] * n
        tokens: list[list[P.TokenOutput]] = [[] for _ in range(n)]
        async for p in pieces:
            texts[p.index].append(p.text)
            tokens[p.index].append(p.token)
            finish[p.index] = p.finish_reason or finish[p.index]
        choices = [self.choice(i, texts[i], tokens[i], finish[i]) for i in range(n)]
        completion_tokens = sum(map(len, tokens))
        return self.response_model(
            **self.head(), choices=choices, usage=self.usage(prompt_tokens, completion_tokens)
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> Usage:
        total = prompt_tokens + completion_tokens
        return Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
        )


class CompletionShape(Shape):
    id_prefix = "cmpl"
    response_model = CompletionResponse
    chunk_model = CompletionStreamResponse

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_name: str,
        req: CompletionRequest,
        echoes: list[str] | None = None,
    ):
        """echoes: with `echo`, each prompt's text, which its choice's text starts with."""
        super().__init__(tokenizer, model_name, req)
        self.echoes = echoes

    def choice(
        self, index: int, texts: list[str], toks: list[P.TokenOutput], finish: str | None
    ) -> CompletionChoice:
        text = "".join(texts)
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = CompletionLogprobs(
                tokens=[self.token(t.token_id) for t in toks],
                token_logprobs=[t.logprob for t in toks],
                top_logprobs=[{self.token(i): lp for i, lp in t.top_logprobs or []} for t in toks],
            )
        return CompletionChoice(
            index=index,
            text=text if self.echoes is None else self.echoes[index] + text,
            logprobs=logprobs,
            finish_reason=finish,
            token_ids=self.token_ids(toks),
        )

    def chunk_choice(self, p: Piece) -> CompletionChoice:
        choice = self.choice(p.index, [p.text], [p.token], p.finish_reason)
        if self.echoes is not None and p.token.index:  # the prompt comes with the first only
            choice.text = p.text
        return choice


class ChatShape(Shape):
    id_prefix = "chatcmpl"
    response_model = ChatCompletionResponse
    chunk_model = ChatCompletionStreamResponse

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_name: str,
        req: ChatRequest,
        calls: Format | None,
        thinks: bool,
    ):
        """calls: the answer may hold tool calls written so, which come out of its text
        (tools.parse); streamed, text that may be a call is held back to the end
        (tools.ToolStream).
        thinks: `<think>` opens reasoning_content (reasoning.py), before any call."""
        super().__init__(tokenizer, model_name, req)
        self.calls, self.thinks = calls, thinks
        self.streams: dict[int, ToolStream] = {}
        self.thoughts: dict[int, ReasoningStream] = {}
        self.reasoning_tokens = 0

    def usage(self, prompt_tokens: int, completion_tokens: int) -> Usage:
        out = super().usage(prompt_tokens, completion_tokens)
        if self.thinks:
            out.completion_tokens_details = TokenDetails(reasoning_tokens=self.reasoning_tokens)
        return out

    def logprobs(self, toks: list[P.TokenOutput]) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        return ChatLogprobs(
            content=[
                ChatLogprob(
                    token=self.token(t.token_id),
                    logprob=t.logprob,
                    top_logprobs=[
                        TopLogprob(token=self.token(i), logprob=lp)
                        for i, lp in t.top_logprobs or []
                    ],
                )
                for t in toks
            ]
        )

    def choice(
        self, index: int, texts: list[str], toks: list[P.TokenOutput], finish: str | None
    ) -> ChatChoice:
        reasoning, text = None, "".join(texts)
        if self.thinks:
            reasoning, text, count = split(texts)
            self.reasoning_tokens += count
        content, calls = parse(self.calls, text) if self.calls else (text, [])
        return ChatChoice(
            index=index,
            message=AssistantMessage(
                content=content, reasoning_content=reasoning, tool_calls=calls or None
            ),
            logprobs=self.logprobs(toks),
            finish_reason="tool_calls" if calls and finish == "stop" else finish,
            token_ids=self.token_ids(toks),
        )

    def chunk_choice(self, p: Piece) -> ChatStreamChoice:
        role = "assistant" if p.token.index == 0 else None  # a choice's first chunk says it
        reasoning, text, calls, finish = "", p.text, [], p.finish_reason
        if self.thinks:
            thought = self.thoughts.setdefault(p.index, ReasoningStream())
            before = thought.reasoning_tokens
            reasoning, text = thought.feed(p.text)
            if finish is not None:
                more, rest = thought.finish()
                reasoning, text = reasoning + more, text + rest
            self.reasoning_tokens += thought.reasoning_tokens - before
        if self.calls:
            stream = self.streams.setdefault(p.index, ToolStream(self.calls))
            text = stream.feed(text)
            if finish is not None:
                rest, calls = stream.finish()
                text += rest
        return ChatStreamChoice(
            index=p.index,
            delta=DeltaMessage(
                role=role,
                content=text if text or not reasoning else None,
                reasoning_content=reasoning or None,
                tool_calls=calls or None,
            ),
            logprobs=self.logprobs([p.token]),
            finish_reason="tool_calls" if calls and finish == "stop" else finish,
            token_ids=self.token_ids([p.token]),
        )


class ClosingStream(StreamingResponse):
    """A stream whose pieces are closed however its response ends: a client dropped for not
    reading (limits.WriteTimeout) leaves the generators suspended, not cancelled, and their
    cleanup (aborting the request on the services, the metrics) must run now, not whenever
    the garbage collector gets to them. `release` frees its admission slots, which a stream
    whose client left before its first byte never reaches from its generators."""

    def __init__(self, content, release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
            await self.body_iterator.aclose()


async def merged(gens: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Pieces of several choices as they come; errors propagate; all cancelled on exit."""
    if len(gens) == 1:
        try:
            async for p in gens[0]:
                yield p
        finally:
            await gens[0].aclose()
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
