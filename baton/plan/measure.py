"""Time a real engine, pinned like one worker of the planned deployment: prefill steps at a
few prompt lengths, decode steps at a few batch sizes and context lengths, and the copy that
a KV hand-off costs. A step is timed as a service runs it: schedule, forward, postprocess."""

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec
import torch

from baton.config import EngineConfig
from baton.engine import Engine
from baton.plan.profile import Profile
from baton.request import Sequence
from baton.sampling_params import SamplingParams

PREFILL_TOKENS = (32, 128, 512, 1024)
DECODE_BATCHES = (1, 8, 32)
DECODE_CONTEXTS = (128, 1024)
DECODE_STEPS = 4  # timed per (batch, context), after one untimed
# messages of a hand-off (offer, pull, release): not measured here, assumed
HANDOFF_FIXED_S = 0.002


@contextmanager
def pinned(threads: int) -> Iterator[None]:
    """This process on `threads` CPUs with as many torch threads, as `baton up` pins a
    worker; both restored after."""
    cpus, num_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, sorted(cpus)[:threads])
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(num_threads)


def measure(
    config: EngineConfig,
    threads: int,
    prefill_tokens: tuple[int, ...] = PREFILL_TOKENS,
    decode_batches: tuple[int, ...] = DECODE_BATCHES,
    decode_contexts: tuple[int, ...] = DECODE_CONTEXTS,
    log: Callable[[str], None] = print,
) -> Profile:
    # fresh prompts must not hit the prefix cache; one step must hold the longest prompt;
    # the pool, the largest decode batch at the longest context
    longest = max(*prefill_tokens, max(decode_contexts) + DECODE_STEPS + 2)
    config = msgspec.structs.replace(
        config,
        threads=threads,
        enable_prefix_caching=False,
        max_num_batched_tokens=max(prefill_tokens),
        max_chunk_tokens=None,
        max_num_seqs=max(decode_batches),
        num_blocks=max(decode_batches) * -(-longest // config.block_size),
    )
    with pinned(threads):
        engine = Engine.build(config)
        if longest >= engine.max_model_len:
            raise ValueError(
                f"profiling needs {longest} tokens of context; the model has {engine.max_model_len}"
            )
        rng = random.Random(0)
        vocab = engine.model.args.vocab_size

        def ids(n: int) -> list[int]:
            return [rng.randrange(vocab // 4, vocab) for _ in range(n)]  # no special tokens

        log(f"profiling prefill at {', '.join(map(str, prefill_tokens))} tokens")
        time_prefill(engine, ids(min(prefill_tokens)))  # warm-up
        prefill = [(n, time_prefill(engine, ids(n))) for n in prefill_tokens for _ in range(2)]
        decode = []
        for context in decode_contexts:
            log(
                f"profiling decode at batch {', '.join(map(str, decode_batches))}, context {context}"
            )
            for batch in decode_batches:
                decode += time_decode(engine, [ids(context) for _ in range(batch)])
        per_token = time_kv_copy(engine.kv.block_nbytes // engine.kv.block_size)
    return Profile.fit(
        model=str(config.model or "default"),
        dtype=config.dtype,
        threads=threads,
        prefill_samples=prefill,
        decode_samples=decode,
        handoff_fixed_s=HANDOFF_FIXED_S,
        handoff_per_token_s=per_token,
    )


def step(engine: Engine, sched) -> tuple[int, int, float]:
    """One step: (sequences, context tokens they attend to, seconds)."""
    t = time.perf_counter()
    batch = sched.schedule()
    context = sum(s.seq.num_computed_tokens + s.num_new_tokens for s in batch)
    sched.postprocess(batch, engine.runner.run(batch))
    return len(batch), context, time.perf_counter() - t


def time_prefill(engine: Engine, prompt: list[int]) -> float:
    sched = engine.scheduler()
    sched.add(Sequence("prefill", prompt, SamplingParams(max_tokens=1, temperature=0)))
    return step(engine, sched)[2]


def time_decode(engine: Engine, prompts: list[list[int]]) -> list[tuple[int, int, float]]:
    """Decode steps over sequences that arrive with their prompt computed, as a KV hand-off
    leaves them; the KV bytes are never written, which costs the same to read."""
    sched = engine.scheduler()
    params = SamplingParams(max_tokens=DECODE_STEPS + 2, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        seq = Sequence(f"decode-{i}", [*prompt, prompt[-1]], params, num_prompt_tokens=len(prompt))
        engine.kv_manager.allocate(seq, len(prompt))
        seq.num_computed_tokens = len(prompt)
        sched.add(seq)
    step(engine, sched)
    samples = [step(engine, sched) for _ in range(DECODE_STEPS)]
    for i in range(len(prompts)):
        sched.abort(f"decode-{i}")
    return samples


def time_kv_copy(bytes_per_token: int, tokens: int = 1024) -> float:
    """Seconds a token's KV takes to copy between pools (the shm transport's cost; the
    others add a socket): the best of 5 copies of `tokens` tokens."""
    src = torch.ones(bytes_per_token * tokens, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return min(times) / tokens
