"""The block pool and prefix cache, without a model: exact block ids and free order."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.cache.block_pool import BlockPool, OutOfBlocks
from baton.cache.kv_manager import KVCacheManager
from baton.request import Sequence
from baton.sampling_params import SamplingParams


def seq(req_id: str, tokens: list[int]) -> Sequence:
    return Sequence(req_id, tokens, SamplingParams())


def test_allocate_in_order_and_free_to_the_tail():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    pool.release([1, 0])
    # fresh block 5 first, then the freed ones in release order
    assert pool.allocate(3) == [5, 1, 0]
    assert pool.num_free == 0
    with pytest.raises(OutOfBlocks, match="asked for 1 KV blocks, 0 free"):
        pool.allocate(1)


def test_cached_blocks_are_evicted_lru_only_when_free_runs_out():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    pool.register(a, b"A")
    pool.register(b, b"B")
    pool.release([b, a, c])  # b then a become evictable; c (no hash) goes to the free list
    assert pool.num_free == 4
    assert pool.allocate(2) == [3, c]  # free list first: nothing evicted yet
    assert pool.lookup(b"B") == b
    assert pool.allocate(1) == [b]  # least recently released cached block goes first
    assert pool.lookup(b"B") is None and pool.lookup(b"A") == a
    pool.share(a)  # a prefix hit revives a cached block
    assert pool.ref_counts[a] == 1 and pool.num_free == 0
    pool.check_invariants()


def test_double_release_is_an_error():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([b])


def test_prefix_hit_shares_full_blocks_but_never_the_last_prompt_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = seq("a", list(range(10)))  # blocks: [0..3] [4..7] [8, 9]
    kv.match_prefix(a)
    assert a.block_ids == [] and a.num_computed_tokens == 0
    kv.allocate(a, 10)
    assert a.block_ids == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_computed(a)

    b = seq("b", [*range(8), 99, 98, 97])  # shares the first two blocks
    kv.match_prefix(b)
    assert b.block_ids == [0, 1] and b.num_computed_tokens == 8
    assert kv.pool.ref_counts[:3] == [2, 2, 1]

    c = seq("c", list(range(8)))  # an exact 2-block prompt: the last block is recomputed
    kv.match_prefix(c)
    assert c.block_ids == [0] and c.num_computed_tokens == 4

    for s in (a, b, c):
        kv.free(s)
    assert kv.pool.num_used == 0
    kv.pool.check_invariants()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("asf"), st.integers(0, 7), st.integers(1, 40)), max_size=60)
)
def test_random_allocate_share_free_keeps_invariants(ops):
    """Random traffic over a small pool: no block both free and held; all counts return to 0."""
    kv = KVCacheManager(num_blocks=12, block_size=4)
    live: dict[int, Sequence] = {}
    for op, slot, n in ops:
        if op == "a" and slot not in live:  # a new sequence, maybe hitting the prefix cache
            s = seq(str(slot), [t % 5 for t in range(n)])
            kv.match_prefix(s)
            todo = s.num_tokens - s.num_computed_tokens
            if kv.can_allocate(s, todo):
                kv.allocate(s, todo)
                s.num_computed_tokens = s.num_tokens
                kv.cache_computed(s)
                live[slot] = s
            else:
                kv.free(s)
        elif op == "s" and slot in live:  # the sequence grows by n tokens
            s = live[slot]
            if kv.can_allocate(s, n):
                kv.allocate(s, n)
                s.token_ids += [7] * n
                s.num_computed_tokens = s.num_tokens
                kv.cache_computed(s)
        elif op == "f" and slot in live:
            kv.free(live.pop(slot))
        kv.pool.check_invariants()
        held = sum(len(s.block_ids) for s in live.values())
        assert sum(kv.pool.ref_counts) == held
    for s in live.values():
        kv.free(s)
    assert kv.pool.num_used == 0 and sum(kv.pool.ref_counts) == 0
    kv.pool.check_invariants()
