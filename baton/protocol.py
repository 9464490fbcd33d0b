"""Every message on every Baton socket, as msgspec Structs, grouped by socket.

Sockets (ZeroMQ):
- gateway ROUTER <- DEALER of every service: `ToGateway` up, `ToService` down.
- decode KV ROUTER <- DEALER of every prefill: `PrefillToDecode` and `DecodeToPrefill`;
  KVBlocks is followed by one extra frame per contiguous run of blocks (the bytes never go
  through msgpack).

One transfer id, minted by the gateway, names a request on both legs and in every KV message
(`req_id`). Block ids on the wire are always the sender's own logical ids.
"""

import msgspec

from baton.sampling_params import SamplingParams

# --- gateway -> services ---------------------------------------------------------------


class PrefillRequest(msgspec.Struct, tag=True, frozen=True):
    req_id: str
    token_ids: list[int]
    params: SamplingParams
    decode_id: str  # the decode service chosen to continue it
    decode_kv_addr: str
    num_prompt_tokens: int = -1  # < len(token_ids) when resuming with tokens already generated


class Abort(msgspec.Struct, tag=True, frozen=True):
    req_id: str


ToService = PrefillRequest | Abort


# --- services -> gateway -----------------------------------------------------------------


class Load(msgspec.Struct, frozen=True):
    queued_tokens: int  # prompt tokens waiting or being prefilled
    running: int  # sequences in the decode batch (prefill: in progress)
    free_blocks: int
    total_blocks: int


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    service_id: str
    role: str  # "prefill" | "decode"
    kv_addr: str  # decode: where prefills connect to hand off KV; prefill: ""
    load: Load


class TokenOutput(msgspec.Struct, tag=True, frozen=True, gc=False):
    """Token `index` (0 = the first output token, from prefill) of a request."""

    req_id: str
    index: int
    token_id: int
    finish_reason: str | None = None  # "stop" | "length"; None while running
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class RequestError(msgspec.Struct, tag=True, frozen=True):
    """The service could not serve this request (peer died, KV lost, bad input)."""

    req_id: str
    message: str


ToGateway = Heartbeat | TokenOutput | RequestError


# --- prefill <-> decode (KV hand-off, pull) ------------------------------------------------


class KVLayout(msgspec.Struct, frozen=True):
    """What both ends must agree on before any block moves; exchanged once per peer pair."""

    model: str  # a fingerprint of the model config
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_nbytes: int


class Hello(msgspec.Struct, tag=True, frozen=True):
    prefill_id: str
    layout: KVLayout


class HelloReply(msgspec.Struct, tag=True, frozen=True):
    ok: bool
    reason: str = ""


class KVOffer(msgspec.Struct, tag=True, frozen=True):
    """Prefill has computed the KV of `token_ids[:num_computed]` into `block_ids`."""

    req_id: str
    token_ids: list[int]  # prompt + the first sampled token
    num_prompt_tokens: int
    num_computed: int
    params: SamplingParams
    block_ids: list[int]


class KVPull(msgspec.Struct, tag=True, frozen=True):
    """Decode reserved its own blocks and asks for the bytes."""

    req_id: str


class KVBlocks(msgspec.Struct, tag=True, frozen=True):
    """Followed by one frame per run: runs[i] = (first block, count) in the sender's ids."""

    req_id: str
    runs: list[tuple[int, int]]


class KVRelease(msgspec.Struct, tag=True, frozen=True):
    """Decode is done with the prefill's blocks (copied, or the request ended)."""

    req_id: str


class KVAbort(msgspec.Struct, tag=True, frozen=True):
    req_id: str
    reason: str


class KeepAlive(msgspec.Struct, tag=True, frozen=True):
    """Renews every lease the receiver holds for the sender."""


PrefillToDecode = Hello | KVOffer | KVBlocks | KVAbort | KeepAlive
DecodeToPrefill = HelloReply | KVPull | KVRelease | KVAbort | KeepAlive


class Codec:
    """An encoder and a typed decoder for one socket direction, built once."""

    def __init__(self, incoming):
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder(incoming).decode
