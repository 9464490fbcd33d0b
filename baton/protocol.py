"""Every message on every Baton socket, as msgspec Structs, grouped by socket.

Sockets (ZeroMQ):
- gateway ROUTER <- DEALER of every service: `ToGateway` up, `ToService` down.
- decode KV ROUTER <- DEALER of every prefill: `PrefillToDecode` and `DecodeToPrefill`;
  KVBlocks is followed by one extra frame per contiguous run of blocks (the bytes never go
  through msgpack). Over shm and NIXL no bytes cross this socket: the decode reads the
  prefill's blocks itself, using the regions the prefill offered once in Hello.

One transfer id, minted by the gateway, names a request on both legs and in every KV message
(`req_id`). Block ids on the wire are always the sender's own logical ids.
"""

from collections.abc import Callable
from enum import IntEnum, StrEnum
from typing import Annotated

import msgspec

from baton.request import FinishReason
from baton.sampling_params import SamplingParams


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


# --- gateway -> services ---------------------------------------------------------------


class PrefillRequest(msgspec.Struct, tag=True, frozen=True):
    req_id: str
    token_ids: list[int]
    params: SamplingParams
    decode_id: str  # the decode service chosen to continue it
    decode_kv_addr: str
    num_prompt_tokens: int | None = None  # set when resuming with tokens already generated


class Abort(msgspec.Struct, tag=True, frozen=True):
    req_id: str


class CacheResync(msgspec.Struct, tag=True, frozen=True):
    """The gateway's index of a service's prefix cache missed a batch of CacheEvents (or
    knows nothing of it yet): send a snapshot."""


ToService = PrefillRequest | Abort | CacheResync


# --- services -> gateway -----------------------------------------------------------------


# What a load may say: a negative or absurd figure would win (or lose) every routing choice,
# so one that is out of these bounds fails the heartbeat's decoding (counted, dropped)
Count = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]


class Load(msgspec.Struct, frozen=True):
    queued_tokens: Count  # prompt tokens waiting or being prefilled
    running: Count  # sequences in the decode batch (prefill: in progress)
    free_blocks: Count
    total_blocks: Count
    # the service's fitted step time, seconds ~= fixed + per_unit * units (baton.slo): units
    # are prompt tokens on a prefill, sequences on a decode; 0 before it is measured
    step_fixed_s: Seconds = 0.0
    step_per_unit_s: Seconds = 0.0
    step_budget: Count = 0  # units one step can take (prefill: its token budget)
    # prompt tokens computed before a new prompt gets its first chunk (its scheduler played
    # forward over the queue: baton.scheduler.tokens_ahead)
    ahead_tokens: Count = 0
    chunk_tokens: Count = 0  # a prompt's tokens per step while others wait
    # prompts received so far (PrefillRequests): the gateway counts those it sent since
    requests_seen: Count = 0
    # decode: prompt tokens a second it computes beside its batch within the TPOT target
    # (baton.slo.PromptPacer.rate; 0: not measured yet)
    prompt_rate: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 0.0
    prompt_budget: Count = 0  # decode: prompt tokens a step takes at most (its token budget)
    prompt_token_s: Seconds = 0.0  # decode: what a prompt token adds to its step (PromptPacer)
    threads: Count = 0  # the engine's threads (its cores): a step's time is for that many
    tier_capacity_blocks: Count = 0  # blocks its KV tier can hold (baton.cache.tier)


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    service_id: str
    role: Role
    kv_addr: str  # decode: where prefills connect to hand off KV; prefill: ""
    load: Load
    incarnation: str = ""  # new each process start: a restart under the same id is a death
    draining: bool = False  # leaving: finishes what it has, takes nothing new


class TokenOutput(msgspec.Struct, tag=True, frozen=True, gc=False):
    """Token `index` (0 = the first output token, from prefill) of a request."""

    req_id: str
    index: int
    token_id: int
    finish_reason: FinishReason | None = None  # None while running
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class RequestError(msgspec.Struct, tag=True, frozen=True):
    """The service could not serve this request (peer died, KV lost, bad input)."""

    req_id: str
    message: str
    retryable: bool = False  # a peer died or the KV was lost: another service may resume it


BlockHash = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]  # chain_hash's
# hashes in one CacheEvents at most: 18 bytes each in msgpack, 3.6 MB, under the gateway's 4 MiB
MAX_CACHE_EVENTS = 200_000
Hashes = Annotated[list[BlockHash], msgspec.Meta(max_length=MAX_CACHE_EVENTS)]


class CacheEvents(msgspec.Struct, tag=True, frozen=True):
    """Batch `seq` of what the sender's prefix cache (its pool and KV tier) gained and lost
    since batch seq - 1, by chained block hash (baton.cache.events); `reset`: `stored` is
    everything it holds."""

    seq: Count
    stored: Hashes
    removed: Hashes
    reset: bool = False


ToGateway = Heartbeat | TokenOutput | RequestError | CacheEvents


# --- prefill <-> decode (KV hand-off, pull) ------------------------------------------------


class KVLayout(msgspec.Struct, frozen=True):
    """What both ends must agree on before any block moves; exchanged once per peer pair."""

    model: str  # a fingerprint of the model config
    dtype: str  # the cache's: the model's, or int8 (an 8-bit cache: values, then scales)
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_nbytes: int


class ShmRegion(msgspec.Struct, frozen=True):
    """A KV pool in a shared-memory file: a decode on the same host maps it once."""

    path: str
    nbytes: int


class NixlRegion(msgspec.Struct, frozen=True):
    """A KV pool registered with a NIXL agent: what a peer needs to READ it one-sided."""

    agent_metadata: bytes
    addr: int
    nbytes: int


class Hello(msgspec.Struct, tag=True, frozen=True):
    """The prefill's side of the handshake: layout, pool size, and the regions it offers for
    one-sided reads (the decode picks the transport; kvtransfer.handshake)."""

    prefill_id: str
    layout: KVLayout
    num_blocks: int  # each region spans num_blocks * layout.block_nbytes bytes
    transport: str  # the prefill's configured transport (baton.config.Transport)
    shm: ShmRegion | None = None
    nixl: NixlRegion | None = None


class HelloReply(msgspec.Struct, tag=True, frozen=True):
    ok: bool
    reason: str = ""
    transport: str = ""  # the one chosen for this pair: zmq-tcp | zmq-ipc | shm | nixl


class KVOffer(msgspec.Struct, tag=True, frozen=True):
    """Prefill has computed the KV of `token_ids[:num_computed]` into `block_ids`.

    A prompt prefilled in several chunks is offered as it goes (streaming): each offer with
    final=False names the full blocks computed so far, the decode reads what is new, and the
    final offer adds the last blocks and the first sampled token."""

    req_id: str
    token_ids: list[int]  # prompt + the first sampled token (final=False: the prompt)
    num_prompt_tokens: int
    num_computed: int
    params: SamplingParams
    block_ids: list[int]
    final: bool = True


class KVPull(msgspec.Struct, tag=True, frozen=True):
    """Decode reserved its own blocks and asks for the bytes of `block_ids`, offered ones
    (ZeroMQ transports only; over shm and NIXL the decode reads the blocks itself)."""

    req_id: str
    block_ids: list[int]
    # the leading blocks wanted only in these (offset, nbytes) ranges of each (kvtransfer InPart)
    num_in_part: int = 0
    ranges: list[tuple[int, int]] = []


class KVBlocks(msgspec.Struct, tag=True, frozen=True):
    """Followed by one frame per run: runs[i] = (first block, count) in the sender's ids; the
    runs of blocks pulled in part come first, each frame their ranges' bytes, block by block."""

    req_id: str
    runs: list[tuple[int, int]]


class KVRelease(msgspec.Struct, tag=True, frozen=True):
    """Decode is done with the prefill's blocks (copied, or the request ended)."""

    req_id: str
    num_bytes: int = 0  # what landed in the decode's blocks; 0 when nothing was copied


class HandoffEnd(IntEnum):
    """How one hand-off ends, the same words on both sides (kvtransfer.sender, .receiver)."""

    FINISHED = 0  # the KV landed and the request runs on at the decode
    ABORTED = 1  # the request ended normally (at its first token, or by the gateway): no error
    FAILED = 2  # it cannot be handed off (refused, a bad offer or read): the gateway may resume
    EXPIRED = 3  # a peer went silent past its lease or timeout: as FAILED


class KVAbort(msgspec.Struct, tag=True, frozen=True):
    """One side gives up the hand-off; the other lets go of its blocks (a decode answers
    KVRelease). Only FAILED and EXPIRED hand-offs fail their request."""

    req_id: str
    reason: str
    end: HandoffEnd = HandoffEnd.FAILED


class Rehello(msgspec.Struct, tag=True, frozen=True):
    """The decode does not know the sender (it restarted, or forgot a prefill silent for too
    long): say Hello again, then offer `req_id` again."""

    req_id: str


class KeepAlive(msgspec.Struct, tag=True, frozen=True):
    """Renews every lease the receiver holds for the sender."""


PrefillToDecode = Hello | KVOffer | KVBlocks | KVAbort | KeepAlive
DecodeToPrefill = HelloReply | KVPull | KVRelease | KVAbort | Rehello | KeepAlive


class Codec:
    """An encoder and a typed decoder for one socket direction, built once. `on_bad` hears of
    each malformed message `try_decode` drops (the service counts and logs it)."""

    def __init__(self, incoming, on_bad: Callable[[Exception], None] | None = None):
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder(incoming).decode
        self.on_bad = on_bad

    def try_decode(self, raw: bytes | memoryview):
        """The message, or None for a malformed one: a peer's garbage never stops a loop."""
        try:
            return self.decode(raw)
        except msgspec.DecodeError as e:
            if self.on_bad is not None:
                self.on_bad(e)
            return None
