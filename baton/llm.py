"""baton.LLM: the in-process aggregated engine, shaped like vLLM's offline API.

Continuous batching and chunked prefill over the same scheduler and runner the services use.
It is the correctness reference and the aggregated baseline for benchmarks.
"""

import itertools
import time
from dataclasses import dataclass, field

import msgspec

from baton.config import EngineConfig
from baton.engine import Engine
from baton.request import FinishReason, Logprob, Sequence
from baton.sampling_params import SamplingParams
from baton.text import IncrementalDetokenizer, StopStringMatcher, final_text


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[Logprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Text:
    """Per-request text state, present when the model has a tokenizer."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    text: str = ""


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "bfloat16", **engine_kwargs):
        config = {"model": model, "dtype": dtype, **engine_kwargs}
        try:  # convert, not the constructor: it checks every value against its type
            engine_config = msgspec.convert(config, EngineConfig)
        except msgspec.ValidationError as e:
            raise ValueError(f"bad engine config: {e}") from e
        self.engine = Engine.build(engine_config)
        self.tokenizer = self.engine.tokenizer
        self.scheduler = self.engine.scheduler()
        self._ids = itertools.count()

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        outputs: dict[str, RequestOutput] = {}
        texts: dict[str, _Text] = {}
        for prompt, p in zip(prompts, params, strict=True):
            ids = self._tokenize(prompt)
            if not ids:
                raise ValueError("prompt is empty")
            if p.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            seq = Sequence(str(next(self._ids)), ids, p)
            self.scheduler.add(seq)
            outputs[seq.req_id] = RequestOutput(
                seq.req_id, prompt if isinstance(prompt, str) else None, ids
            )
            if self.tokenizer is not None:
                texts[seq.req_id] = _Text(
                    IncrementalDetokenizer(self.tokenizer, ids), StopStringMatcher(p.stop)
                )
        while self.scheduler.has_work:
            for seq in self.step(texts):
                out = outputs[seq.req_id]
                t = texts.get(seq.req_id)
                out.outputs = [
                    CompletionOutput(
                        0,
                        t.text if t else "",
                        seq.output_token_ids,
                        seq.finish_reason.openai,
                        seq.logprobs if seq.params.logprobs is not None else None,
                    )
                ]
                out.finished = True
        return list(outputs.values())

    def step(self, texts: dict[str, _Text]) -> list[Sequence]:
        """One engine step; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if not batch:  # prefixes on their way from the KV tier
            time.sleep(0.001)
            return []
        sampled = self.engine.runner.run(batch)
        finished = self.scheduler.postprocess(batch, sampled)
        for s, token in zip(batch, sampled, strict=True):
            t = texts.get(s.seq.req_id)
            if token is None or t is None:
                continue
            piece, stopped = t.stops.feed(t.detok.add(token.token_id))
            t.text += piece
            if stopped and not s.seq.is_finished:
                self.scheduler.finish(s.seq, FinishReason.STOP)
                finished.append(s.seq)
            elif s.seq.is_finished and not stopped:
                t.text += final_text(t.detok, t.stops)
        return finished
