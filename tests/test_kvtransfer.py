"""KV transports at block level: a source pool of random bytes, scattered block ids, and
each transport's Reader copying them into a destination pool. For shm and NIXL the source
lives in another process (spawned, as a prefill would be) and is killed with SIGKILL."""

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import pytest
import torch
import zmq

from baton import protocol as P
from baton.cache.kv_cache import block_nbytes, full_layer_ranges
from baton.kvtransfer import nixl, shm
from baton.kvtransfer.base import (
    InPart,
    Landed,
    TransferError,
    Window,
    joint_runs,
    valid_in_part,
)
from baton.kvtransfer.handshake import Refused, choose
from baton.kvtransfer.zmq import ZmqReader, block_frames
from baton.model.llama import ModelArgs

NUM_BLOCKS, BLOCK_NBYTES = 64, 4608
LAYOUT = P.KVLayout("test", "bfloat16", 16, 3, 1, 6, BLOCK_NBYTES)
# runs and singles, out of order, both ends of the pool
SRC = [5, 6, 7, 40, 2, 3, 63, 0]
DST = [10, 11, 12, 13, 30, 31, 1, 50]
NUM_RUNS = 5  # (5->10 x3) (40->13) (2->30 x2) (63->1) (0->50)


def random_pool(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (NUM_BLOCKS, BLOCK_NBYTES), dtype=torch.uint8, generator=g)


def test_joint_runs_need_both_sides_consecutive():
    assert joint_runs(SRC, DST) == [(5, 10, 3), (40, 13, 1), (2, 30, 2), (63, 1, 1), (0, 50, 1)]
    assert joint_runs([], []) == []


def test_a_block_a_sliding_window_left_behind_is_needed_only_in_its_full_layers():
    # Gemma 3's pattern: layers 0, 1, 3, 4 slide; 2 and 5 see everything. A layer's K and V
    # in a 16-token block of 2 KV heads x 8 dims: 2 x 16 x 2 x 8 values
    args = ModelArgs(64, 32, 64, 6, 4, 2, 8, 1e-6, 512, (1.0,), sliding_window=40,
                     sliding_layers=(0, 1, 3, 4))  # fmt: skip
    layer = 2 * 16 * 2 * 8
    assert full_layer_ranges(args, 16, torch.bfloat16) == ((2 * layer * 2, layer * 2),
                                                          (5 * layer * 2, layer * 2))  # fmt: skip
    # int8: the values, then fp32 scales per (K/V, token, head) of all layers after them
    scales, per = 6 * layer, 2 * 16 * 2 * 4
    assert full_layer_ranges(args, 16, torch.int8) == (
        (2 * layer, layer), (5 * layer, layer), (scales + 2 * per, per), (scales + 5 * per, per),
    )  # fmt: skip
    assert block_nbytes(args, 16, torch.int8) == scales + 6 * per
    # every layer slides (Mistral): nothing of such a block is needed
    assert full_layer_ranges(ModelArgs(**{**vars(args), "sliding_layers": tuple(range(6))}),
                             16, torch.bfloat16) == ()  # fmt: skip
    # a query at 100 sees 61..100: blocks 0-2 (tokens 0-47) hold none of it, block 3 does
    window = Window(40, 16, full_layer_ranges(args, 16, torch.bfloat16))
    assert [window.blocks_behind(p) for p in (39, 40, 55, 56, 100)] == [0, 0, 1, 1, 3]
    # what a prefill takes from a decode's pull: ranges in order, apart, inside a block
    assert valid_in_part(IN_PART, 8, BLOCK_NBYTES, num_layers=3)
    for bad in (((0, 512), (256, 512)), ((2048, 8), (0, 8)), ((4600, 16),), ((0, 0),), ()):
        assert not valid_in_part(InPart(4, bad), 8, BLOCK_NBYTES, num_layers=3), bad
    assert not valid_in_part(InPart(9, IN_PART.ranges), 8, BLOCK_NBYTES, num_layers=3)


def source(transport: str, conn: Connection, seed: int) -> None:
    """A prefill stand-in: its pool in shared memory or registered with NIXL, offered in a
    Hello; it lives until told to go (or is killed)."""
    pool = random_pool(seed)
    region = {}
    if transport == "shm":
        segment = shm.Segment(required=True)
        pool = segment.create(pool.numel()).view(NUM_BLOCKS, -1).copy_(pool)
        region["shm"] = segment.region
    else:
        agent = nixl.Agent(f"source-{os.getpid()}", pool)
        region["nixl"] = agent.region
    conn.send_bytes(msgspec.msgpack.encode(P.Hello("src", LAYOUT, NUM_BLOCKS, transport, **region)))
    conn.recv_bytes()


@contextmanager
def spawned_source(transport: str, seed: int) -> Iterator[tuple[mp.Process, P.Hello]]:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=source, args=(transport, theirs, seed), daemon=True)
    proc.start()
    try:
        assert ours.poll(60), "the source did not start"
        yield proc, msgspec.msgpack.decode(ours.recv_bytes(), type=P.Hello)
    finally:
        if proc.is_alive():
            ours.send_bytes(b"go")
            proc.join(10)
        proc.kill()


def read(reader, req_id: str = "r", in_part: InPart | None = None) -> Landed:
    reader.start(req_id, SRC, DST, in_part)
    deadline = time.monotonic() + 10
    while not (landed := reader.poll()):
        assert time.monotonic() < deadline, "the read never landed"
    (one,) = landed
    return one


def assert_copied(dst: torch.Tensor, seed: int) -> None:
    assert torch.equal(dst[DST], random_pool(seed)[SRC])
    untouched = sorted(set(range(NUM_BLOCKS)) - set(DST))
    assert not dst[untouched].any()


# the first 4 blocks (5, 6, 7 -> 10, 11, 12 and 40 -> 13) wanted only in two ranges
IN_PART = InPart(4, ((0, 512), (2048, 1024)))
IN_PART_BYTES = 4 * 1536 + 4 * BLOCK_NBYTES


def assert_copied_in_part(dst: torch.Tensor, seed: int) -> None:
    src, n = random_pool(seed), IN_PART.num_blocks
    assert torch.equal(dst[DST[n:]], src[SRC[n:]])
    wanted = torch.zeros(BLOCK_NBYTES, dtype=torch.bool)
    for offset, size in IN_PART.ranges:
        wanted[offset : offset + size] = True
    assert torch.equal(dst[DST[:n]][:, wanted], src[SRC[:n]][:, wanted])
    assert not dst[DST[:n]][:, ~wanted].any()  # the rest of those blocks never moved


@pytest.fixture
def dst() -> torch.Tensor:
    return torch.zeros(NUM_BLOCKS, BLOCK_NBYTES, dtype=torch.uint8)


@pytest.mark.parametrize("transport", ["shm", "nixl"])
def test_one_sided_read_copies_scattered_blocks_from_another_process(transport, dst):
    with spawned_source(transport, seed=1) as (_, hello):
        agent = nixl.Agent(f"dst-{os.getpid()}", dst) if transport == "nixl" else None
        reader, skipped = choose(hello, transport, dst, agent, zmq_reader=None)
        assert (reader.transport, skipped) == (transport, [])
        assert read(reader) == Landed("r", len(SRC) * BLOCK_NBYTES, NUM_RUNS)
        assert_copied(dst, seed=1)
        dst.zero_()
        assert read(reader, "p", IN_PART) == Landed("p", IN_PART_BYTES, NUM_RUNS)
        assert_copied_in_part(dst, seed=1)
        reader.close()
        path = hello.shm.path if hello.shm else None
    if path:  # the owner unlinked its segment at exit
        assert path not in shm.segments()


def test_zmq_reader_copies_the_runs_it_pulled_and_drops_cancelled_ones(dst):
    src = random_pool(2)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://kv")
    b.connect("inproc://kv")
    pulls: list[P.KVPull] = []
    reader = ZmqReader("zmq-ipc", pulls.append, dst)

    def deliver(req_id: str, in_part: InPart | None = None) -> None:
        runs, frames = block_frames(src, SRC, in_part)  # what the prefill sends on KVPull
        b.send_multipart([b"header", *frames], copy=False)
        got = a.recv_multipart(copy=False)[1:]
        reader.receive(P.KVBlocks(req_id, runs), [f.buffer for f in got])

    reader.start("r", SRC, DST)
    assert pulls == [P.KVPull("r", SRC)]  # the prefill sends just the blocks named
    deliver("r")
    # frames are runs of the sender's ids only: 5-7, 40, 2-3, 63, 0
    assert reader.poll() == [Landed("r", len(SRC) * BLOCK_NBYTES, 5)]
    assert_copied(dst, seed=2)
    # cancelled: its blocks may be another request's by the time the frames arrive
    dst.zero_()
    reader.start("late", SRC, DST)
    assert reader.cancel("late")
    deliver("late")
    assert reader.poll() == [] and not dst.any()
    # in part: the leading blocks' ranges only, gathered into a frame per run (5-7, 40; 2-3, 63, 0)
    reader.start("p", SRC, DST, IN_PART)
    assert pulls[-1] == P.KVPull("p", SRC, 4, [(0, 512), (2048, 1024)])
    deliver("p", IN_PART)
    assert reader.poll() == [Landed("p", IN_PART_BYTES, 5)]
    assert_copied_in_part(dst, seed=2)
    ctx.destroy(linger=0)


def rss_shmem_kib() -> int:
    status = Path(f"/proc/{os.getpid()}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("RssShmem:")).split()[1])


def test_an_shm_pool_is_resident_from_the_start():
    # mapped whole as it is made (as a private pool is touched), so the service's RSS does
    # not grow as prompts first reach each block, and no step takes those page faults
    segment = shm.Segment(required=True)
    before = rss_shmem_kib()
    pool = segment.create(16 << 20)
    assert rss_shmem_kib() - before >= 16 << 10
    del pool
    os.unlink(segment.region.path)


def test_shm_blocks_stay_readable_after_the_owner_is_killed_and_sweep_unlinks_them(dst):
    with spawned_source("shm", seed=3) as (proc, hello):
        reader = shm.ShmReader(hello.shm, dst)
        assert hello.shm.path not in shm.sweep()  # alive: it holds the lock
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert hello.shm.path in shm.sweep()
        assert hello.shm.path not in shm.segments()
        # our mapping outlives the unlink: the leased blocks can still be copied
        assert read(reader).error is None
        assert_copied(dst, seed=3)
        reader.close()


def test_nixl_read_from_a_killed_peer_fails_then_a_restarted_peer_attaches_afresh(dst):
    agent = nixl.Agent(f"dst-{os.getpid()}", dst)
    with spawned_source("nixl", seed=4) as (proc, hello):
        reader = nixl.NixlReader(agent, hello.nixl)
        assert read(reader).error is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        landed = read(reader, "after-kill")
        assert landed.req_id == "after-kill" and "disconnected" in landed.error
        with pytest.raises(TransferError, match="disconnected"):
            reader.start("next", SRC, DST)  # detached: no read is even tried
    dst.zero_()
    with spawned_source("nixl", seed=5) as (_, hello):  # the peer restarted: a new agent
        reader = nixl.NixlReader(agent, hello.nixl)
        assert read(reader).error is None
        assert_copied(dst, seed=5)
        reader.close()


def hello_with(**regions) -> P.Hello:
    return P.Hello("src", LAYOUT, NUM_BLOCKS, regions.pop("transport", "auto"), **regions)


def test_handshake_picks_shm_on_one_host_and_says_why_it_falls_back(dst):
    segment = shm.Segment(required=True)
    segment.create(NUM_BLOCKS * BLOCK_NBYTES)
    try:
        reader, skipped = choose(hello_with(shm=segment.region), "auto", dst, None, None)
        assert (reader.transport, skipped) == ("shm", [])
        # another host: no such file; no NIXL here -> ZeroMQ, with both reasons
        elsewhere = P.ShmRegion("/dev/shm/baton-kv-1-elsewhere", segment.region.nbytes)
        zmq_reader = ZmqReader("zmq-tcp", print, dst)
        reader, skipped = choose(hello_with(shm=elsewhere), "auto", dst, None, lambda: zmq_reader)
        assert reader is zmq_reader
        assert skipped == [
            "shm: the prefill's segment is not here (another host)",
            "nixl: the prefill offers no nixl region",
        ]
        # named transports never fall back
        with pytest.raises(Refused, match="shm: the prefill's segment is not here"):
            choose(hello_with(shm=elsewhere), "shm", dst, None, lambda: zmq_reader)
        with pytest.raises(Refused, match="transports differ: prefill nixl, decode shm"):
            choose(hello_with(transport="nixl"), "shm", dst, None, lambda: zmq_reader)
        # a region that is not the announced pool's size
        small = P.ShmRegion(segment.region.path, BLOCK_NBYTES)
        with pytest.raises(Refused, match=f"region has {BLOCK_NBYTES} B"):
            choose(hello_with(shm=small, transport="shm"), "auto", dst, None, None)
    finally:
        os.unlink(segment.region.path)
