"""The KV tier chain (baton.cache.ram_tier over baton.cache.tier): host RAM alone or above the
disk, on a pool of plain bytes. What RAM lets go spills to the disk; a prefix comes back from
either, byte for byte; a session written through lands on the disk; the chain reports what it
gains and loses as one tier."""

import queue
import time
from types import SimpleNamespace

import numpy as np
import pytest

from baton.cache.ram_tier import RamTier
from baton.cache.tier import DiskTier
from baton.service_io import TierMetrics

SEED = 7
BLOCK_NBYTES = 64
FINGERPRINT = bytes(range(16))


def pool(num_blocks: int = 16) -> np.ndarray:
    print("seed", SEED)
    rng = np.random.default_rng(SEED)
    return rng.integers(0, 256, (num_blocks, BLOCK_NBYTES), dtype=np.uint8)


class Loop:  # what TierMetrics reads of a service's loop (held by a weak reference)
    id: str
    sched: SimpleNamespace


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def landed(tier, timeout_s: float = 10.0) -> list:
    """What the tier's loads returned, once one has (the disk reads on its own thread)."""
    deadline = time.monotonic() + timeout_s
    while not (out := tier.landed()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return out


def test_ram_alone_keeps_the_latest_blocks_and_gives_them_back_byte_for_byte():
    blocks = pool()
    original = blocks.copy()
    stored = []
    ram = RamTier(3 * BLOCK_NBYTES, blocks)
    ram.on_stored, ram.dropped = stored.append, queue.SimpleQueue()
    for i in range(4):  # blocks 0..3 evicted in turn: room for 3
        ram.save(i, h(i))
    assert stored == [h(0), h(1), h(2), h(3)] and ram.dropped.get_nowait() == h(0)
    assert not ram.holds(h(0)) and ram.holds(h(3)) and ram.num_blocks == 3
    blocks[8:11] = 0  # the pool reuses what it gave up
    ram.load("req", [(8, h(1)), (9, h(2)), (10, h(3))])
    assert ram.landed() == [("req", 3)]  # at once: no disk between
    assert (blocks[8:11] == original[1:4]).all()
    ram.load("again", [(8, h(1)), (9, h(0)), (10, h(2))])  # the prefix stops at what is gone
    assert ram.landed() == [("again", 1)]


def test_what_ram_lets_go_spills_to_the_disk_and_a_prefix_comes_back_from_both(tmp_path):
    blocks = pool()
    original = blocks.copy()
    disk = DiskTier(tmp_path, 100 * BLOCK_NBYTES, FINGERPRINT, blocks)
    chain = RamTier(2 * BLOCK_NBYTES, blocks, below=disk)
    stored = []
    chain.on_stored, chain.dropped = stored.append, queue.SimpleQueue()
    for i in range(5):
        chain.save(i, h(i))
    # 0, 1 and 2 went down to the disk as RAM filled: still the chain's, so not dropped
    assert chain.dropped.empty() and all(chain.indexed(h(i)) for i in range(5))
    assert disk.num_blocks == 3 and chain.num_blocks == 5 and chain.cap_files == 2 + disk.cap_files
    assert set(stored) == {h(i) for i in range(5)}
    blocks[8:13] = 0
    chain.load("req", [(8 + i, h(i)) for i in range(5)])  # 0-2 from the disk, 3-4 from RAM
    assert landed(chain) == [("req", 5)]
    assert (blocks[8:13] == original[:5]).all()
    assert chain.stats.loaded_blocks == 5 and chain.stats.read_bytes == 5 * BLOCK_NBYTES
    # and each tier's own, as the service's metrics show them (label tier="ram"/"disk")
    ram, below = chain.levels
    assert (ram.name, ram.stats.loaded_blocks, ram.size_bytes) == ("ram", 2, 2 * BLOCK_NBYTES)
    assert (below.name, below.stats.loaded_blocks) == ("disk", 3)
    assert below.size_bytes == disk.size_bytes and chain.size_bytes == sum(
        level.size_bytes for level in chain.levels
    )
    metrics = TierMetrics()  # a service's collector, over a loop holding this chain
    loop = Loop()
    loop.id, loop.sched = "decode-0", SimpleNamespace(num_tier_hit_tokens=0, kv=SimpleNamespace(
        tier=chain, pool=SimpleNamespace(num_retained=0)))  # fmt: skip
    metrics.loops.add(loop)
    samples = {
        (m.name, s.labels["tier"]): s.value
        for m in metrics.collect()
        for s in m.samples
        if "tier" in s.labels
    }
    assert samples[("baton_kv_tier_read_bytes", "ram")] == 2 * BLOCK_NBYTES
    assert samples[("baton_kv_tier_read_bytes", "disk")] == 3 * BLOCK_NBYTES
    # a block the disk lost: the prefix ends there, whatever RAM holds after it
    (tmp_path / FINGERPRINT.hex() / f"{h(1).hex()}.kv").unlink()
    chain.load("gone", [(8 + i, h(i)) for i in range(5)])
    assert landed(chain) == [("gone", 1)]
    assert chain.stats.loaded_blocks == 6  # RAM's 3 and 4 were copied but are not the prefix
    chain.close()


def test_a_block_read_back_from_the_disk_is_hot_and_rams_when_the_pool_lets_it_go(tmp_path):
    blocks = pool()
    original = blocks.copy()
    disk = DiskTier(tmp_path, 100 * BLOCK_NBYTES, FINGERPRINT, blocks)
    chain = RamTier(2 * BLOCK_NBYTES, blocks, below=disk)
    for i in range(4):  # 0 and 1 spill to the disk
        chain.save(i, h(i))
    chain.load("turn 2", [(8, h(0))])
    assert landed(chain) == [("turn 2", 1)] and disk.stats.loaded_blocks == 1
    chain.save(8, h(0))  # the pool evicts it again: RAM takes it, 2 spills to the disk
    ram, _ = chain.levels
    assert ram.size_bytes == 2 * BLOCK_NBYTES and disk.indexed(h(2))
    blocks[8] = 0
    chain.load("turn 3", [(8, h(0))])  # from RAM now, at once
    assert chain.landed() == [("turn 3", 1)] and (blocks[8] == original[0]).all()
    assert disk.stats.loaded_blocks == 1 and chain.levels[0].stats.loaded_blocks == 1
    chain.close()


def test_a_sessions_blocks_written_through_go_to_the_disk_and_outlive_the_process(tmp_path):
    blocks = pool()
    chain = RamTier(
        8 * BLOCK_NBYTES, blocks, below=DiskTier(tmp_path, 1 << 20, FINGERPRINT, blocks)
    )
    chain.save(0, h(0), durable=True)
    chain.save(1, h(1))  # an eviction: RAM
    chain.close()  # the disk's queued writes done
    restarted = RamTier(8 * BLOCK_NBYTES, blocks, DiskTier(tmp_path, 1 << 20, FINGERPRINT, blocks))
    assert restarted.holds(h(0)) and not restarted.holds(h(1))
    restarted.close()
    alone = RamTier(8 * BLOCK_NBYTES, blocks)  # nothing below outlives the process: the pool
    alone.save(0, h(0), durable=True)  # keeps it until it evicts it, and RAM takes it then
    assert not alone.holds(h(0))


@pytest.mark.parametrize("below", [False, True])
def test_a_block_with_no_room_anywhere_is_dropped_and_counted(tmp_path, below):
    blocks = pool()
    disk = DiskTier(tmp_path, BLOCK_NBYTES + 64, FINGERPRINT, blocks) if below else None
    chain = RamTier(BLOCK_NBYTES, blocks, below=disk)
    chain.dropped = queue.SimpleQueue()
    for i in range(3):
        chain.save(i, h(i))
    if disk is not None:
        disk.close()  # its trim (room for one file) ran: 0 was deleted, 1 is there
        assert not chain.indexed(h(0)) and chain.indexed(h(1)) and chain.indexed(h(2))
        assert chain.stats.deleted_files == 1
    else:
        assert chain.stats.dropped_writes == 2 and not chain.indexed(h(1))
    dropped = set()
    while not chain.dropped.empty():
        dropped.add(chain.dropped.get_nowait())
    assert h(0) in dropped and h(2) not in dropped
