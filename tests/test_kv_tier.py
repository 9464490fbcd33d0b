"""The KV tier below the pool and agent sessions' retention: blocks the pool evicts go to disk
and come back, byte for byte, for the next turn; a torn, truncated or foreign file is never
served; a session's blocks are the last the pool evicts, until their TTL; through `baton up`, a
decode killed -9 and started again under the same tier is where the next turn goes (its report
of its cache says it holds the conversation), it loads the conversation from the tier, and the
next turn's greedy tokens equal a cold run's."""

import subprocess
import time
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest
import torch
from stack import Stack, free_port

import baton
from baton.cache.block_pool import BlockPool
from baton.cache.kv_manager import KVCacheManager, chain_hash
from baton.cache.tier import HEADER, DiskTier
from baton.gateway.sessions import LiveSessions
from baton.request import Sequence
from baton.sampling_params import SamplingParams
from baton.scheduler import Scheduler

FINGERPRINT = bytes(range(16))
BLOCK_NBYTES = 4096


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pool_bytes(num_blocks: int, seed: int) -> np.ndarray:
    print(f"seed {seed}")
    return np.random.default_rng(seed).integers(0, 256, (num_blocks, BLOCK_NBYTES), np.uint8)


def saved(tier_dir: Path, blocks: np.ndarray, hashes: list[bytes]) -> DiskTier:
    """A tier that has written `blocks[i]` under `hashes[i]` (all its queued writes done)."""
    tier = DiskTier(tier_dir, 1 << 30, FINGERPRINT, blocks)
    for i, h in enumerate(hashes):
        tier.save(i, h)
    tier.close()
    return tier


def load(tier: DiskTier, pairs: list[tuple[int, bytes]]) -> int:
    tier.load("k", pairs)
    deadline = time.monotonic() + 10
    while not (done := tier.landed()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ((key, n),) = done
    assert key == "k"
    return n


def test_session_blocks_are_evicted_last_until_their_ttl():
    clock = Clock()
    pool = BlockPool(4, clock=clock)
    session, plain = pool.allocate(2), pool.allocate(2)
    for b, h in zip(session + plain, [b"s0", b"s1", b"p0", b"p1"], strict=True):
        pool.register(b, h)
    pool.release(session[::-1], keep_until=clock.now + 60)  # released first, kept longer
    pool.release(plain[::-1])
    assert pool.num_retained == 2 and pool.num_free == 4
    assert sorted(pool.allocate(2)) == sorted(plain)  # the ordinary ones go first
    assert pool.lookup(b"s0") is not None
    pool.release(pool.allocate(1))  # under pressure, a session block goes only as a last resort
    assert pool.num_retained == 1
    pool.check_invariants()

    clock2 = Clock()
    pool = BlockPool(3, clock=clock2)
    kept, later = pool.allocate(1), pool.allocate(1)
    pool.register(kept[0], b"k")
    pool.register(later[0], b"l")
    pool.release(kept, keep_until=clock2.now + 60)
    pool.release(later)
    clock2.now += 61  # its TTL passed: an ordinary cached block again, older than `later`
    assert pool.allocate(2)[1] == kept[0]
    assert pool.lookup(b"k") is None and pool.lookup(b"l") == later[0]
    assert pool.num_retained == 0
    pool.check_invariants()


def test_the_gateway_counts_a_session_live_until_its_ttl_passes():
    clock = Clock()
    live = LiveSessions(clock)
    live.seen("a", 10.0)
    live.seen("b", 100.0)
    live.seen(None, 100.0)  # a request of no session
    assert live.count() == 2
    clock.now += 11
    assert live.count() == 1
    live.seen("a", 10.0)  # a next turn: live again
    assert live.count() == 2


def test_evicted_bytes_are_copied_before_reuse_and_load_back(tmp_path):
    blocks = pool_bytes(4, seed=5)
    original = blocks.copy()
    tier = DiskTier(tmp_path, 1 << 30, FINGERPRINT, blocks)
    pool = BlockPool(4, on_evict=tier.save)
    held = pool.allocate(4)
    for b in held:
        pool.register(b, bytes([b]) * 16)
    pool.release(held)
    for b in pool.allocate(4):  # each evicted, then overwritten at once, as a step would
        blocks[b] = 0
    tier.close()
    assert tier.stats.written_bytes == 4 * BLOCK_NBYTES

    into = np.zeros_like(blocks)
    restarted = DiskTier(tmp_path, 1 << 30, FINGERPRINT, into)  # indexes what it finds
    assert restarted.num_blocks == 4 and restarted.holds(bytes([2]) * 16)
    assert load(restarted, [(0, bytes([2]) * 16), (3, bytes([0]) * 16)]) == 2
    assert (into[0] == original[2]).all() and (into[3] == original[0]).all()
    assert restarted.stats.read_bytes == 2 * BLOCK_NBYTES


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "foreign", "another hash"])
def test_damaged_files_are_refused_counted_and_deleted(tmp_path, damage):
    blocks = pool_bytes(2, seed=6)
    hashes = [b"a" * 16, b"b" * 16]
    tier = saved(tmp_path, blocks, hashes)
    path = tier.dir / f"{hashes[0].hex()}.kv"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":
        data[HEADER.size + 100] ^= 1
    elif damage == "foreign":  # another model's block under this model's name
        data[8:24] = bytes(16)
    else:  # a file renamed: its header names another block
        data[24:40] = hashes[1]
    path.write_bytes(bytes(data))
    into = np.zeros_like(blocks)
    reader = DiskTier(tmp_path, 1 << 30, FINGERPRINT, into)
    assert load(reader, [(0, hashes[0]), (1, hashes[1])]) == 0  # stops at the first bad one
    assert reader.stats.corrupt_files == 1 and reader.stats.loaded_blocks == 0
    assert not path.exists() and not reader.holds(hashes[0])
    assert load(reader, [(1, hashes[1])]) == 1  # the good one still serves


def test_a_full_tier_deletes_its_oldest_blocks_and_nothing_fails(tmp_path):
    blocks = pool_bytes(3, seed=7)
    tier = DiskTier(tmp_path, 2 * (HEADER.size + BLOCK_NBYTES), FINGERPRINT, blocks)
    for i in range(3):
        tier.save(i, bytes([i]) * 16)
    tier.close()
    assert tier.stats.deleted_files == 1 and tier.num_blocks == 2
    assert sorted(p.name for p in tier.dir.iterdir()) == [
        f"{bytes([i]).hex() * 16}.kv" for i in (1, 2)
    ]


def test_a_request_aborted_while_its_prefix_loads_frees_its_blocks_once_read(tmp_path):
    """The scheduler, without a model: a prompt whose prefix only the tier holds waits for the
    read; aborted meanwhile, it ends at once, and its blocks return to the pool when the read
    is done (the worker writes into them until then)."""
    tokens = list(range(3, 3 + 4 * 6 + 1))  # six full blocks of 4, then the last token
    hashes, parent = [], None
    for i in range(6):
        parent = chain_hash(parent, tokens[4 * i : 4 * i + 4])
        hashes.append(parent)
    saved(tmp_path, pool_bytes(6, seed=8), hashes)
    tier = DiskTier(tmp_path, 1 << 30, FINGERPRINT, np.zeros((8, BLOCK_NBYTES), np.uint8))
    sched = Scheduler(
        KVCacheManager(8, 4, tier=tier), max_num_seqs=4, max_num_batched_tokens=64,
        max_model_len=64, eos_token_ids=frozenset(),
    )  # fmt: skip
    seq = Sequence("r", tokens, SamplingParams(max_tokens=2))
    sched.add(seq)
    assert sched.schedule() == [] and sched.loading == {"r": seq} and sched.has_work
    assert sched.abort("r") is seq and seq.is_finished
    assert sched.kv.pool.num_used == 6  # still being read into
    deadline = time.monotonic() + 10
    while sched.loading:
        assert time.monotonic() < deadline
        sched.schedule()
        time.sleep(0.01)
    assert sched.kv.pool.num_used == 0 and not sched.has_work
    sched.kv.pool.check_invariants()

    again = Sequence("again", tokens, SamplingParams(max_tokens=2))
    sched.add(again)  # the same prefix: what was read is cached now, one token to compute
    assert [(s.seq.req_id, s.num_new_tokens) for s in sched.schedule()] == [("again", 1)]
    assert tier.stats.loaded_blocks == 6


# --- the engine: a conversation whose earlier turns the pool evicted ---------------------------
SP = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def turns(seed: int = 11) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    print(f"seed {seed}")
    first = torch.randint(3, 512, (90,), generator=g).tolist()
    filler = torch.randint(3, 512, (110,), generator=g).tolist()
    return first, filler


def engine(model: Path, tier_dir: Path | None, ram_gib: float | None = None) -> baton.LLM:
    # 32 blocks of 4 tokens: the filler turn evicts everything the first turn left
    return baton.LLM(
        str(model),
        dtype="float32",
        num_blocks=32,
        block_size=4,
        kv_tier_dir=tier_dir and str(tier_dir),
        kv_tier_ram_gib=ram_gib,
    )


# the chain below the pool: disk; RAM (room for ~140 of the tiny model's 768-byte blocks: all
# the first turn's); RAM for ~14 above the disk, the rest spilled there
CHAINS = {"disk": (True, None), "ram": (False, 1e-4), "ram+disk": (True, 1e-5)}


@pytest.mark.parametrize("chain", CHAINS)
def test_next_turn_loads_its_prefix_from_the_tier_token_exact(tmp_path, tiny_llama, chain):
    first, filler = turns()
    cold = baton.LLM(str(tiny_llama), dtype="float32", enable_prefix_caching=False)
    disk, ram_gib = CHAINS[chain]
    llm = engine(tiny_llama, tmp_path if disk else None, ram_gib)
    answer = llm.generate([first], SP)[0].outputs[0].token_ids
    llm.generate([filler], SP)
    follow_up = [*first, *answer, 7, 8, 9, 10, 11]
    expected = cold.generate([follow_up], SP)[0].outputs[0].token_ids

    pool_hits = llm.scheduler.num_prefix_hit_tokens
    got = llm.generate([follow_up], SP)[0].outputs[0].token_ids
    assert got == expected
    # the first turn's prompt and answer (but the partial last block) came back: from the
    # tier, but for a block or so the pool had not reused yet
    tier_hits = llm.scheduler.num_tier_hit_tokens
    assert tier_hits >= len(first)
    assert (
        tier_hits + llm.scheduler.num_prefix_hit_tokens - pool_hits
        == (len(first) + len(answer) - 1) // 4 * 4
    )
    assert llm.engine.kv_manager.pool.num_used == 0  # every block freed
    llm.engine.kv_manager.pool.check_invariants()
    if chain == "ram+disk":  # what RAM let go went down to the disk, and came back from there
        tier = llm.engine.kv_manager.tier
        assert tier.below.num_blocks > 0 and tier.below.stats.loaded_blocks > 0
    llm.engine.close()


def test_a_session_is_written_through_and_survives_a_restart(tmp_path, tiny_llama):
    first, _ = turns()
    session = msgspec.structs.replace(SP, session_ttl_s=60.0)
    llm = engine(tiny_llama, tmp_path)
    answer = llm.generate([first], session)[0].outputs[0].token_ids
    llm.engine.close()  # its queued writes done; the pool, with every block still in it, gone
    follow_up = [*first, *answer, 7, 8, 9, 10, 11]
    cold = baton.LLM(str(tiny_llama), dtype="float32", enable_prefix_caching=False)
    expected = cold.generate([follow_up], SP)[0].outputs[0].token_ids

    restarted = engine(tiny_llama, tmp_path)
    assert restarted.generate([follow_up], session)[0].outputs[0].token_ids == expected
    assert restarted.scheduler.num_tier_hit_tokens == (len(first) + len(answer) - 1) // 4 * 4
    restarted.engine.close()

    # every file torn: all recomputed, counted, still exact
    for path in next(tmp_path.iterdir()).iterdir():
        path.write_bytes(path.read_bytes()[:100])
    damaged = engine(tiny_llama, tmp_path)
    assert damaged.generate([follow_up], SP)[0].outputs[0].token_ids == expected
    assert damaged.scheduler.num_tier_hit_tokens == 0
    assert damaged.engine.kv_manager.tier.stats.corrupt_files == 1  # the first read stops it


def test_without_a_tier_the_evicted_turn_is_computed_again(tiny_llama):
    """The control for the test above: the same turns hit nothing once the pool evicted."""
    first, filler = turns()
    llm = engine(tiny_llama, None)
    answer = llm.generate([first], SP)[0].outputs[0].token_ids
    llm.generate([filler], SP)
    hits = llm.scheduler.num_prefix_hit_tokens
    llm.generate([[*first, *answer, 7, 8, 9, 10, 11]], SP)
    # at most the one block the pool had not reused yet
    assert llm.scheduler.num_prefix_hit_tokens - hits <= 4
    assert llm.scheduler.num_tier_hit_tokens == 0


# --- through `baton up` ------------------------------------------------------------------------
def test_a_decode_restarted_under_its_tier_serves_the_next_turn_from_it(tmp_path, tiny_text_model):
    """Two decodes over one tier directory. The one that served the session is killed -9 and
    started again: its first report of its cache lists the session's blocks, found on disk,
    so the gateway sends the next turn to it (the other could read the files too, but its
    cache holds nothing of the session), and the turn is loaded, not computed."""
    tier_dir = tmp_path / "tier"
    engine_args = ["--block-size", "4", "--num-blocks", "48", "--kv-tier-dir", str(tier_dir)]
    stack = Stack(tmp_path / "logs", tiny_text_model, *engine_args, prefill=0, decode=2)
    session = {"x-session-id": "agent-1", "x-session-ttl-s": "600"}
    cold = baton.LLM(str(tiny_text_model), dtype="float32", enable_prefix_caching=False)
    first, _ = turns(seed=12)
    joined = None
    try:
        client = stack.client()

        def complete(prompt: list[int], headers=None) -> list[int]:
            r = client.completions.create(
                model="", prompt=prompt, max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True}, extra_headers=headers,
            )  # fmt: skip
            return r.choices[0].token_ids

        answer = complete(first, session)
        (served,) = [  # kept for the session
            name for name in stack.services("decode")
            if stack.metric(name, "baton_kv_retained_blocks") > 0
        ]  # fmt: skip
        full_blocks = (len(first) + len(answer) - 1) // 4
        deadline = time.monotonic() + 30
        while len(list(tier_dir.glob("*/*.kv"))) < full_blocks:  # written through, behind
            assert time.monotonic() < deadline, "the session's blocks never reached the tier"
            time.sleep(0.1)

        old = stack.services()[served]
        stack.kill(served)
        argv = list(old["argv"])
        argv[argv.index("--id") + 1] = "decode-again"
        argv[argv.index("--http-port") + 1] = str(port := free_port())
        joined = subprocess.Popen(
            argv, stdout=(tmp_path / "again.log").open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while httpx.get(f"{stack.url}/health").json()["decode"] != 2 or not _joined(port):
            assert time.monotonic() < deadline and joined.poll() is None, "it never joined"
            time.sleep(0.3)

        follow_up = [*first, *answer, 7, 8, 9]
        assert (
            complete(follow_up, session) == cold.generate([follow_up], SP)[0].outputs[0].token_ids
        )
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        hits = next(
            line
            for line in metrics.splitlines()
            if line.startswith("baton_kv_tier_hit_tokens_total")
        )
        assert float(hits.split()[-1]) == full_blocks * 4
    finally:
        if joined is not None:
            joined.kill()
        stack.stop()


def _joined(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    except httpx.ConnectError:
        return False
