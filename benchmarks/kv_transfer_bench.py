"""KV hand-off cost per transport between two processes, beside a plain in-process memcpy of
the same blocks; SmolLM2's bf16 blocks, or (--model llama3-8b) a larger model's.

    python -m baton.benchmarks.kv_transfer_bench [--reps 10] [--model smollm2|llama3-8b]

A source process (the prefill) holds a pool offered in a Hello, exactly as the prefill
service builds it; this process (the decode) gets a Reader from kvtransfer.handshake.choose
and times each request from `start` until it lands in its own blocks:
- zmq-tcp / zmq-ipc: KVPull -> zero-copy frames, one per run -> copy into our blocks
- shm: the source's pool in /dev/shm, mapped once; one `copy_` per run
- nixl: one READ per request over UCX (cross-memory attach on one host)
- memcpy: the same per-run `copy_` inside one process, the ceiling

Each process is pinned to its own core with one torch thread, as `baton up` runs them.
Blocks: scattered (every other block at the source, descending at the destination: one run
per block) and contiguous (one run). Median of --reps requests after one warm-up.
benchmarks/kv_stream_bench.py measures the hand-off end to end, streamed or not.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time
from functools import partial
from multiprocessing.connection import Connection
from typing import NamedTuple

import msgspec
import torch
import zmq

from baton import protocol as P
from baton.kvtransfer import nixl, shm
from baton.kvtransfer.base import Landed, joint_runs
from baton.kvtransfer.handshake import choose
from baton.kvtransfer.zmq import ZmqReader, block_frames

BLOCK_TOKENS = 16


class Shape(NamedTuple):
    """A model's KV block (bf16, all layers, K and V) and the prompt sizes to move."""

    name: str
    num_layers: int
    kv_heads: int
    head_dim: int
    prompts: tuple[int, ...]

    @property
    def block_nbytes(self) -> int:
        return self.num_layers * 2 * BLOCK_TOKENS * self.kv_heads * self.head_dim * 2

    @property
    def pool_blocks(self) -> int:
        return 2 * max(self.prompts) // BLOCK_TOKENS  # room for the scattered case

    @property
    def layout(self) -> P.KVLayout:
        args = (self.num_layers, self.kv_heads, self.head_dim, self.block_nbytes)
        return P.KVLayout(self.name, "bfloat16", BLOCK_TOKENS, *args)


# a larger model's blocks are 5.7x SmolLM2's (2 MiB): its pools stop at 4,096 tokens here
SHAPES = {
    "smollm2": Shape("SmolLM2-135M", 30, 3, 64, (512, 4096, 16384)),
    "llama3-8b": Shape("Llama-3-8B", 32, 8, 128, (512, 4096)),
}
TRANSPORTS = ("zmq-tcp", "zmq-ipc", "shm", "nixl")


def cases(shape: Shape) -> list[tuple[int, str, list[int], list[int]]]:
    """(prompt tokens, layout, source ids, destination ids)."""
    out = []
    for tokens in shape.prompts:
        n = tokens // BLOCK_TOKENS
        out.append((tokens, "scattered", list(range(0, 2 * n, 2)), list(range(2 * n - 1, 0, -2))))
        out.append((tokens, "contiguous", list(range(n)), list(range(n, 2 * n))))
    return out


def source(shape: Shape, transport: str, conn: Connection, addr: str) -> None:
    """The prefill side: offer the pool; over ZeroMQ, answer each KVPull with the frames of
    the blocks it names."""
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    regions = {}
    if transport == "shm":
        segment = shm.Segment(required=True)
        pool = segment.create(shape.pool_blocks * shape.block_nbytes).view(shape.pool_blocks, -1)
        regions["shm"] = segment.region
    else:
        pool = torch.empty(shape.pool_blocks, shape.block_nbytes, dtype=torch.uint8)
    pool.fill_(1)  # every page touched, as a pool the prefill has written
    if transport == "nixl":
        agent = nixl.Agent(f"bench-source-{os.getpid()}", pool)
        regions["nixl"] = agent.region
    hello = P.Hello("bench", shape.layout, shape.pool_blocks, transport, **regions)
    conn.send_bytes(msgspec.msgpack.encode(hello))
    if not transport.startswith("zmq"):
        conn.recv_bytes()  # until the reader is done
        return
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(addr)
    sock.send(b"ready")
    codec = P.Codec(P.KVPull)
    while True:
        pull = codec.decode(sock.recv())
        if pull.req_id == "stop":
            return
        runs, frames = block_frames(pool, pull.block_ids)
        header = msgspec.msgpack.encode(P.KVBlocks(pull.req_id, runs))
        sock.send_multipart([header, *frames], copy=False)


def time_reads(shape: Shape, reader, recv, reps: int) -> list[tuple[float, Landed]]:
    """Per case: median seconds from start until landed, and the landing."""
    out = []
    for i, (_, _, src_ids, dst_ids) in enumerate(cases(shape)):
        times = []
        for rep in range(reps + 1):
            t = time.perf_counter()
            reader.start(f"{i}-{rep}", src_ids, dst_ids)
            while not (landed := reader.poll()):
                recv()
            times.append(time.perf_counter() - t)
        out.append((statistics.median(times[1:]), landed[0]))
    return out


def bench_transport(
    shape: Shape, transport: str, dst: torch.Tensor, reps: int
) -> list[tuple[float, Landed]]:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    zctx = zmq.Context()
    router = zctx.socket(zmq.ROUTER)
    router.bind("ipc:///tmp/baton-kvbench" if transport == "zmq-ipc" else "tcp://127.0.0.1:*")
    addr = router.getsockopt_string(zmq.LAST_ENDPOINT)
    proc = ctx.Process(target=source, args=(shape, transport, theirs, addr))
    proc.start()
    hello = msgspec.msgpack.decode(ours.recv_bytes(), type=P.Hello)
    agent = nixl.Agent(f"bench-reader-{os.getpid()}", dst) if transport == "nixl" else None
    recv = lambda: None  # noqa: E731  one-sided reads land by themselves
    if transport.startswith("zmq"):
        identity, _ = router.recv_multipart()
        encode = msgspec.msgpack.encode
        send = lambda msg: router.send_multipart([identity, encode(msg)])  # noqa: E731
        zmq_reader = partial(ZmqReader, transport, send, dst)
        codec = P.Codec(P.KVBlocks)

        def recv() -> None:
            _, header, *frames = router.recv_multipart(copy=False)
            reader.receive(codec.decode(header.bytes), [f.buffer for f in frames])

    else:
        zmq_reader = None
    reader, _ = choose(hello, transport, dst, agent, zmq_reader)
    results = time_reads(shape, reader, recv, reps)
    if transport.startswith("zmq"):
        send(P.KVPull("stop", []))
    else:
        ours.send_bytes(b"done")
        reader.close()
    proc.join()
    zctx.destroy(linger=0)
    return results


def bench_memcpy(shape: Shape, dst: torch.Tensor, reps: int) -> list[tuple[float, Landed]]:
    src = torch.ones(shape.pool_blocks, shape.block_nbytes, dtype=torch.uint8)
    out = []
    for _, _, src_ids, dst_ids in cases(shape):
        runs = joint_runs(src_ids, dst_ids)
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            for s, d, n in joint_runs(src_ids, dst_ids):
                dst[d : d + n].copy_(src[s : s + n])
            times.append(time.perf_counter() - t)
        landed = Landed("memcpy", len(src_ids) * shape.block_nbytes, len(runs))
        out.append((statistics.median(times[1:]), landed))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2", help="whose KV blocks")
    args = ap.parse_args()
    shape = SHAPES[args.model]
    os.sched_setaffinity(0, {len(os.sched_getaffinity(0)) - 1})
    torch.set_num_threads(1)
    dst = torch.ones(shape.pool_blocks, shape.block_nbytes, dtype=torch.uint8)
    results = {"memcpy": bench_memcpy(shape, dst, args.reps)}
    for transport in TRANSPORTS:
        results[transport] = bench_transport(shape, transport, dst, args.reps)
    print(
        "| prompt tokens | blocks | MiB | layout | transport | runs | ms / request | GB/s | vs memcpy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (tokens, layout, src_ids, _) in enumerate(cases(shape)):
        base_s = results["memcpy"][i][0]
        for transport in ("memcpy", *TRANSPORTS):
            seconds, landed = results[transport][i]
            assert landed.error is None, landed
            mib = landed.num_bytes / 2**20
            gbs = landed.num_bytes / seconds / 1e9
            print(
                f"| {tokens} | {len(src_ids)} | {mib:.1f} | {layout} | {transport} | "
                f"{landed.num_runs} | {seconds * 1e3:.2f} | {gbs:.2f} | {base_s / seconds:.0%} |"
            )


if __name__ == "__main__":
    main()
