"""A service publishes what its prefix cache (pool and KV tier) gains and loses, and the
gateway's index of it follows exactly: through evictions to the tier, the tier's size cap,
sessions written through; a missed batch is noticed, a snapshot asked for (at most once a
second) and the index is exact again."""

import random
import time

import numpy as np
import pytest

from baton import protocol as P
from baton.cache.kv_manager import KVCacheManager
from baton.cache.tier import DiskTier
from baton.gateway.prefix_index import PrefixIndex
from baton.request import Sequence
from baton.sampling_params import SamplingParams

BLOCK_NBYTES = 1024
WIRE = P.Codec(P.ToGateway)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def serve(kv: KVCacheManager, tokens: list[int], session: bool) -> None:
    """One request's life in the pool, as the scheduler leads it: prefix hit, compute the
    rest, publish its full blocks, free (a session's retained, and written through)."""
    seq = Sequence("r", tokens, SamplingParams(session_ttl_s=60.0 if session else 0.0))
    kv.match_prefix(seq)
    kv.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_computed(seq)
    kv.free(seq)


def settle(tier: DiskTier | None) -> None:
    """Wait until the tier's worker has done every job queued (saves, trims) so far."""
    if tier is None:
        return
    tier.load("settled", [])
    deadline = time.monotonic() + 10
    while not tier.landed():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def publish(kv: KVCacheManager) -> P.CacheEvents:
    batch = kv.cache_events()
    assert batch is not None
    return WIRE.decode(WIRE.encode(batch))  # as the gateway receives it


@pytest.mark.parametrize("with_tier", [True, False], ids=["pool+tier", "pool"])
def test_the_gateway_index_follows_the_cache_exactly(tmp_path, with_tier):
    seed = 23
    print(f"seed {seed}")
    rng = random.Random(seed)
    blocks = np.zeros((12, BLOCK_NBYTES), np.uint8)
    tier = DiskTier(tmp_path, 10 * (BLOCK_NBYTES + 52), bytes(16), blocks) if with_tier else None
    kv = KVCacheManager(12, 4, tier=tier)  # the tier: 10 files at most
    clock = Clock()
    index = PrefixIndex(4, clock)
    held = 12 + (tier.cap_files if tier else 0)
    prefixes = [[rng.randrange(3, 50) for _ in range(12)] for _ in range(4)]
    for _ in range(60):
        tokens = rng.choice(prefixes) + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 30))]
        serve(kv, tokens, session=rng.random() < 0.3)
        settle(tier)
        assert not index.apply("d", publish(kv), held)
        assert set(index.held["d"]) == set(kv.held_hashes())
    assert kv.pool.cached_hashes() and (tier is None or tier.stats.deleted_files > 0)  # churned

    serve(kv, prefixes[0] + [7] * 20, session=False)
    kv.cache_events()  # a batch the gateway never gets (a dropped send)
    serve(kv, prefixes[1] + [8] * 20, session=False)
    settle(tier)
    assert index.apply("d", publish(kv), held)  # out of step: ask for a snapshot
    serve(kv, prefixes[2] + [9] * 20, session=False)
    assert not index.apply("d", publish(kv), held)  # asked a moment ago: not again yet
    clock.now += 1.5
    serve(kv, prefixes[3] + [6] * 20, session=False)
    assert index.apply("d", publish(kv), held)

    kv.events.resync()  # the ask, received
    settle(tier)
    snapshot = publish(kv)
    assert snapshot.reset
    assert not index.apply("d", snapshot, held)
    assert set(index.held["d"]) == set(kv.held_hashes())
    serve(kv, prefixes[0] + [5] * 20, session=True)  # and in step from there on
    settle(tier)
    assert not index.apply("d", publish(kv), held)
    assert set(index.held["d"]) == set(kv.held_hashes())
    if tier is not None:
        tier.close()


def test_a_restarted_service_reports_what_its_tier_holds(tmp_path):
    blocks = np.zeros((4, BLOCK_NBYTES), np.uint8)
    kv = KVCacheManager(4, 4, tier=DiskTier(tmp_path, 1 << 20, bytes(16), blocks))
    serve(kv, list(range(3, 3 + 13)), session=True)  # three full blocks, written through
    kv.tier.close()

    again = KVCacheManager(4, 4, tier=DiskTier(tmp_path, 1 << 20, bytes(16), blocks))
    first = publish(again)  # its first batch: everything held, found on disk
    assert first.reset and len(first.stored) == 3
    index = PrefixIndex(4)
    index.apply("d", first, 4 + again.tier.cap_files)
    prompt = [*range(3, 3 + 13), 99]
    assert index.cached_tokens(prompt, None) == {"d": 12}
    again.tier.close()


def test_the_gateways_own_record_counts_only_until_the_service_reports():
    """Where a service reports its cache, what the gateway sent it is a guess for a moment
    (the next turn may come first), then only what the service says it computed counts."""
    clock = Clock()
    index = PrefixIndex(4, clock)
    computed = [*range(3, 3 + 8), 99]  # two full blocks, then the last token
    index.apply("d", P.CacheEvents(1, [], [], reset=True), 100)  # in step, holding nothing
    index.add("d", computed, 100, None)
    assert index.cached_tokens([*computed, 5], None) == {"d": 8}
    clock.now += 3  # it never said it computed them (the request failed, say)
    assert index.cached_tokens([*computed, 5], None) == {}
    index.add("d", computed, 100, None)
    confirmed = index.hashes(computed, None)
    index.apply("d", P.CacheEvents(2, confirmed, []), 100)
    clock.now += 3
    assert index.cached_tokens([*computed, 5], None) == {"d": 8}  # reported: it stays

    index.add("p", computed, 100, None)  # a service that reports nothing: the record is all
    clock.now += 3
    assert index.cached_tokens([*computed, 5], None)["p"] == 8
