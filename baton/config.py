"""Baton's configuration: one TOML file, read by `baton up` and by every service.

Every table is a msgspec Struct, so a typo'd key or a bad value is an error that names the key
and the expected type (`Expected int >= 1, got 0 - at $.engine.block_size`). Each field carries
its documentation in `Meta(description=...)`; `baton config show` prints them with the
effective values.

    [engine]    the model and the paged KV cache, shared by every service
    [prefill]   the prefill pool: count, CPUs, its per-step token budget and chunk size
    [decode]    the decode pool: count, CPUs, its batch cap
    [gateway]   HTTP and service addresses, queue limit, admission, local-prefill threshold
    [slo]       the targets the knobs serve: TTFT, TPOT, attainment
    [autoscale] how fast the pools' desired sizes move; `baton up`'s own services to split
"""

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import msgspec
from msgspec import Meta

Positive = Annotated[int, Meta(ge=1)]


def doc(text: str) -> Meta:
    return Meta(description=text)


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class EngineConfig(Section):
    model: Annotated[str | None, doc("HF directory or GGUF file; unset: SmolLM2-135M-Instruct")] = (
        None
    )
    dtype: Annotated[Literal["float32", "bfloat16"], doc("weights (and KV cache)")] = "bfloat16"
    kv_dtype: Annotated[
        Literal["auto", "int8"],
        doc(
            "auto: the weights' dtype; int8: 8-bit KV with a scale per token and head, "
            "half the bytes each decode step reads and each hand-off moves"
        ),
    ] = "auto"
    quantization: Annotated[
        Literal["int8"] | None,
        doc(
            "int8: every projection's weight in llama.cpp's Q8_0 (8 bits, an fp16 scale per 32 "
            "inputs; a Q8_0 GGUF's own blocks), its input quantized to 8 bits per 32 values as "
            "it runs; unset: the weights in dtype"
        ),
    ] = None
    block_size: Annotated[Positive, doc("tokens per KV block")] = 16
    num_blocks: Annotated[Positive | None, doc("KV pool in blocks; overrides kv_cache_gib")] = None
    kv_cache_gib: Annotated[float, Meta(gt=0), doc("KV pool size per service")] = 1.0
    max_num_seqs: Annotated[Positive, doc("running sequences per step")] = 64
    max_num_batched_tokens: Annotated[Positive, doc("token budget per step")] = 512
    max_chunk_tokens: Annotated[
        Positive | None,
        doc("a prompt's tokens per step while others wait; unset: half the budget"),
    ] = None
    max_model_len: Annotated[Positive | None, doc("context limit; unset: the model's")] = None
    enable_prefix_caching: Annotated[bool, doc("reuse KV blocks of shared prefixes")] = True
    kv_tier_dir: Annotated[
        str | None,
        doc(
            "a directory for KV blocks the pool evicts, read back on a prefix hit (services "
            "on one host may share it); unset: no tier"
        ),
    ] = None
    kv_tier_gib: Annotated[float, Meta(gt=0), doc("the KV tier's size cap per service")] = 16.0
    kv_tier_ram_gib: Annotated[
        Annotated[float, Meta(gt=0)] | None,
        doc(
            "host RAM for KV blocks the pool evicts, above the disk tier when there is one (the "
            "blocks it lets go spill there) or alone; unset: none"
        ),
    ] = None
    threads: Annotated[Positive | None, doc("torch threads; unset: one per pinned CPU")] = None


# The per-pool knobs the SLO drives; each overrides the [engine] value for that pool only.
POOL_ENGINE_KNOBS = ("max_num_seqs", "max_num_batched_tokens", "max_chunk_tokens")


# `[prefill] count = "auto"`: below this many cores, no prefill pool (aggregated, every core
# on one engine). Measured on 2 cores (benchmarks/RESULTS.md, 2026-12-06): one prefill core
# computes a 1,150-token prompt in ~1.9 s, two in ~1.0 s, so the split's single prefill core
# misses a 2 s TTFT where aggregated meets it, and aggregated was at or above vLLM-CPU on every
# workload of the matrix while the split was not.
AUTO_SPLIT_MIN_CPUS = 4


class PoolConfig(Section):
    count: Annotated[
        Annotated[int, Meta(ge=0)] | Literal["auto"],
        doc(
            "services `baton up` starts; prefill's 'auto': 1, or 0 (aggregated) on a machine "
            f"of fewer than {AUTO_SPLIT_MIN_CPUS} cores"
        ),
    ] = 1
    cpus: Annotated[
        str | None,
        doc(
            "CPU list to pin to, e.g. '0' or '2-3'; unset: half the machine each (all of it, "
            "for decode with no prefill pool)"
        ),
    ] = None
    max_num_seqs: Annotated[Positive | None, doc("batch cap (decode: bounds TPOT)")] = None
    max_num_batched_tokens: Annotated[
        Positive | None, doc("token budget per step (prefill: bounds TTFT)")
    ] = None
    max_chunk_tokens: Annotated[
        Positive | None, doc("a prompt's tokens per step while others wait")
    ] = None


class GatewayConfig(Section):
    host: Annotated[str, doc("HTTP bind address")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535), doc("HTTP port")] = 8000
    zmq_addr: Annotated[
        str | None, doc("where services connect; unset with `baton up`: a socket file it names")
    ] = None
    model_name: Annotated[str | None, doc("the name /v1/models reports; unset: the dir's")] = None
    api_key: Annotated[str | None, doc("required as a Bearer token on every route but /health")] = (
        None
    )
    api_key_file: Annotated[
        str | None,
        doc("API keys, one a line, each also accepted (a key per tenant; out of `ps` and configs)"),
    ] = None
    cache_per_api_key: Annotated[
        bool,
        doc(
            "with API keys, a key's requests share cached prefixes only with that key's: no "
            "tenant's timing tells what another sent (a request's cache_salt splits further)"
        ),
    ] = True
    max_queued_requests: Annotated[Positive, doc("requests in flight before 429")] = 256
    max_connections: Annotated[
        Positive,
        doc(
            "HTTP connections served at once; more get a 503 at once. Bounds what slow clients "
            "hold: each upload's body (up to 8 MiB) is kept until it is whole"
        ),
    ] = 512
    admission: Annotated[
        Literal["slo", "queue-limit"],
        doc("slo: 429 when the predicted TTFT misses [slo]; queue-limit: only the count"),
    ] = "slo"
    admission_margin: Annotated[
        float,
        Meta(gt=0, le=1),
        doc("slo admission takes a request if its predicted TTFT <= margin x ttft_ms"),
    ] = 0.85
    admission_load: Annotated[
        float,
        Meta(ge=0),
        doc(
            "below this offered load (prompt work asked over what the stack computes, the last "
            "30 s), slo admission still takes a request predicted to miss its TTFT when the queue "
            "ahead of it is shorter than the target: served late, not refused. 0 (the default): "
            "refuse every predicted miss. 0.9 turned fewer requests away at light load but cost "
            "goodput at the onset of overload (benchmarks/RESULTS.md, 2026-12-07 seventh session)"
        ),
    ] = 0.0
    request_timeout_s: Annotated[
        float, Meta(gt=0), doc("a request still running after this ends with an error")
    ] = 600.0
    write_timeout_s: Annotated[
        float,
        Meta(gt=0),
        doc("a client that takes none of its response for this long is dropped, its request ended"),
    ] = 30.0
    max_n: Annotated[
        int,
        Meta(ge=1),
        doc("choices one request may ask for (`n`); their prompt is handed off once"),
    ] = 8
    session_ttl_s: Annotated[
        float,
        Meta(ge=0),
        doc(
            "a request with an x-session-id header keeps its KV cached this long after it "
            "ends (evicted last, then to the KV tier); x-session-ttl-s asks for another span"
        ),
    ] = 300.0
    max_session_ttl_s: Annotated[
        float, Meta(ge=0), doc("the longest retention x-session-ttl-s may ask for")
    ] = 3600.0
    session_from_user: Annotated[
        bool, doc("the body's `user` names a session too, where no x-session-id does")
    ] = False
    allow_priority: Annotated[
        bool,
        doc(
            "honour a request's `priority` (it jumps queues and preempts others); off: a "
            "non-zero priority is a 400 (vLLM's --scheduling-policy priority)"
        ),
    ] = False
    service_timeout_s: Annotated[
        float,
        Meta(gt=0),
        doc("a service silent (no heartbeat) this long is dead: its requests fail over"),
    ] = 3.0
    max_migrations: Annotated[
        int, Meta(ge=0), doc("times a stream resumes elsewhere after its service dies (0: off)")
    ] = 2
    resume_wait_s: Annotated[
        float,
        Meta(gt=0),
        doc("how long a stream to resume waits for a live service (its only decode restarting)"),
    ] = 10.0
    local_prefill_tokens: Annotated[
        int, Meta(ge=0), doc("prompts up to this many new tokens prefill on the decode (0: never)")
    ] = 0
    cached_prefill_tokens: Annotated[
        int,
        Meta(ge=0),
        doc(
            "a turn whose prefix a decode still caches (it served the turns before) prefills "
            "there when at most this many of its tokens are new: no KV moves (0: never)"
        ),
    ] = 256
    busy_prefill_tokens: Annotated[
        int,
        Meta(ge=0),
        doc(
            "prompts up to this many tokens prefill on a decode when its core, in the TPOT "
            "slack beside its batch, would finish them before the least loaded prefill "
            "(work stealing; 0: never)"
        ),
    ] = 8192

    chat_template: Annotated[
        str | None,
        doc(
            "chat template: hermes, mistral or llama3_json (ours, with tools) or a Jinja "
            "file; unset: the model's"
        ),
    ] = None
    tool_call_parser: Annotated[
        Literal["hermes", "mistral", "llama3_json"] | None,
        doc("how tool calls are written and read: the chat template of the same name shows them"),
    ] = None
    reasoning_parser: Annotated[
        Literal["think"] | None,
        doc("think: an answer opening with <think> reasons until </think> (reasoning_content)"),
    ] = None


class SLOConfig(Section):
    ttft_ms: Annotated[float, Meta(gt=0), doc("time-to-first-token target")] = 2000.0
    tpot_ms: Annotated[float, Meta(gt=0), doc("time-per-output-token target")] = 100.0
    attainment: Annotated[float, Meta(gt=0, le=1), doc("share of requests that must meet both")] = (
        0.9
    )


class AutoscaleConfig(Section):
    max_services: Annotated[
        int,
        Meta(ge=0),
        doc(
            "`baton up` cuts its CPUs into this many shares and moves them between a prefill "
            "and a decode engine as the load's mix shifts (one decode engine on them all while "
            "no prefill is wanted); 0: the pools' counts, fixed"
        ),
    ] = 0
    share_cores: Annotated[
        Positive, doc("cores in each share (`baton up --autoscale` sets it from its CPUs)")
    ] = 1
    window_s: Annotated[float, Meta(gt=0), doc("the signals' window (requests, latencies)")] = 30.0
    down_after_s: Annotated[
        float, Meta(ge=0), doc("a smaller pool (or another split) is wanted this long first")
    ] = 60.0


# auto: shm when prefill and decode share a host, else NIXL, else zmq-tcp (kvtransfer.handshake)
Transport = Literal["auto", "zmq-tcp", "zmq-ipc", "shm", "nixl"]


class BatonConfig(Section):
    transport: Annotated[Transport, doc("how KV blocks move from prefill to decode")] = "auto"
    stream_kv: Annotated[
        bool,
        doc(
            "offer a prompt's KV after each prefill chunk, so the decode copies it while the "
            "rest computes (false: one hand-off after the whole prompt)"
        ),
    ] = True
    kv_peer_timeout_s: Annotated[
        float,
        Meta(ge=5),
        doc(
            "a decode forgets a prefill silent this long: hand-offs from it fail, and its "
            "shared-memory segment is unlinked (keep it above a prefill's longest step)"
        ),
    ] = 30.0
    key_dir: Annotated[
        str | None,
        doc(
            "the service plane's CURVE keys (`baton keys DIR`): every ZeroMQ socket is "
            "authenticated and encrypted; unset: plain sockets (`baton up` binds them to files "
            "in a 0700 directory)"
        ),
    ] = None
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    prefill: PoolConfig = msgspec.field(default_factory=lambda: PoolConfig(count="auto"))
    decode: PoolConfig = msgspec.field(default_factory=PoolConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    slo: SLOConfig = msgspec.field(default_factory=SLOConfig)
    autoscale: AutoscaleConfig = msgspec.field(default_factory=AutoscaleConfig)

    def engine_for(self, role: str) -> EngineConfig:
        """The [engine] table with the pool's own knobs applied."""
        pool: PoolConfig = getattr(self, role)
        knobs = {k: v for k in POOL_ENGINE_KNOBS if (v := getattr(pool, k)) is not None}
        return msgspec.structs.replace(self.engine, **knobs)


class ConfigError(ValueError):
    pass


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> BatonConfig:
    """The TOML file (if any) with dotted-key overrides ('engine.dtype': 'float32') on top;
    an override of None leaves the file's value."""
    table: dict[str, Any] = {}
    where = f"{path}: " if path else ""
    if path:
        try:
            table = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{where}{e}") from e
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = table
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        config = msgspec.convert(table, BatonConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{where}{e}") from e
    return resolve_counts(config)


def resolve_counts(config: BatonConfig) -> BatonConfig:
    """'auto' pool sizes as numbers, for the machine this runs on."""
    pools = {}
    for role in ("prefill", "decode"):
        pool: PoolConfig = getattr(config, role)
        if pool.count == "auto":
            small = len(os.sched_getaffinity(0)) < AUTO_SPLIT_MIN_CPUS
            pools[role] = msgspec.structs.replace(
                pool, count=0 if small and role == "prefill" else 1
            )
    return msgspec.structs.replace(config, **pools)


SECRETS = {"api_key"}  # shown as "(redacted)" by `baton config show`


def to_toml(config: BatonConfig, redact: bool = True) -> str:
    """The effective config as TOML, each key with its description; unset keys commented;
    secrets redacted unless `redact` is off (the file `baton up` hands its children, 0600)."""
    lines = _fields(config, redact)
    for f in msgspec.structs.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Section):
            lines += ["", f"[{f.name}]", *_fields(value, redact)]
    return "\n".join(lines) + "\n"


def _fields(section: Section, redact: bool) -> list[str]:
    import tomli_w

    hints = get_type_hints(type(section), include_extras=True)
    out = []
    for f in msgspec.structs.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, Section):
            continue
        meta = [m for m in get_args(hints[f.name])[1:] if isinstance(m, Meta)]
        text = next((m.description for m in meta if m.description), "")
        if value is None:
            out.append(f"# {f.name} = (unset)  # {text}")
        elif redact and f.name in SECRETS:
            out.append(f"# {f.name} = (redacted)  # {text}")
        else:
            out.append(f"{tomli_w.dumps({f.name: value}).strip()}  # {text}")
    return out
