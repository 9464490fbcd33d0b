"""Per-request state shared by every scheduler (plain Python, no torch).

There is no prefill or decode flag: a sequence has `num_computed_tokens` (those whose KV is in
the cache) and `num_tokens`; scheduling makes the first catch up with the second. A decode-side
request is simply one whose prompt arrived already computed.
"""

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from baton.sampling_params import SamplingParams


class SeqStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    WAITING_FOR_KV = 3  # its prompt's KV is being handed to this service by a prefill


class FinishReason(IntEnum):
    STOP = 0  # EOS, a stop token id or a stop string
    LENGTH = 1  # max_tokens or the context limit
    ABORT = 2  # caller gone, deadline, or peer death
    ERROR = 3  # the service could not serve it

    @property
    def openai(self) -> str:
        return "length" if self is FinishReason.LENGTH else "stop"


@dataclass(slots=True)
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-n (token id, logprob), best first


@dataclass(eq=False)
class Sequence:
    req_id: str
    token_ids: list[int]  # prompt followed by the output so far
    params: SamplingParams
    num_prompt_tokens: int | None = None  # set: tokens after it were generated (a resume)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, chained
    num_cached_blocks: int = 0  # leading blocks already published for prefix hits
    # its KV came without what its sliding-window layers no longer see (kvtransfer Window):
    # its blocks are never published, since a shorter prompt sharing them would need that part
    kv_in_part: bool = False
    # leading blocks given back: every layer slides, and no query will see them again (their
    # ids stay in block_ids, so positions keep their index; the kernels read only the window)
    num_freed_blocks: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    sampler_state: Any = None  # the runner's per-request RNG; opaque here
    grammar: Any = None  # the sampler's grammar matcher (baton.structured); opaque here

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)  # owned: it grows as tokens are sampled
        if self.num_prompt_tokens is None:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason


def check_stop(
    seq: Sequence, eos_token_ids: frozenset[int], max_model_len: int
) -> FinishReason | None:
    """Why `seq` must stop after its newest token, or None. Stop strings are the caller's job
    (they need text)."""
    p = seq.params
    last = seq.token_ids[-1]
    if seq.num_output_tokens >= p.min_tokens and (
        (last in eos_token_ids and not p.ignore_eos) or last in p.stop_token_ids
    ):
        return FinishReason.STOP
    if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
