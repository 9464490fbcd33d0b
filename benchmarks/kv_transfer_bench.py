"""KV hand-off cost over ZeroMQ (tcp, ipc) between two processes, SmolLM2 bf16 block sizes.

    python -m benchmarks.kv_transfer_bench

Per request: the decode side sends KVPull, the prefill side answers with the block frames
(kvtransfer.zmq.block_frames, zero-copy), the decode side copies them into its own scattered
blocks (write_blocks). Median of 20 requests; blocks scattered (no run coalescing) and
contiguous (one frame).
"""

import multiprocessing as mp
import statistics
import time

import torch
import zmq

from kvtransfer.zmq import block_frames, write_blocks

BLOCK_TOKENS = 16
BLOCK_NBYTES = 30 * 2 * BLOCK_TOKENS * 3 * 64 * 2  # SmolLM2 bf16: all layers, K and V
POOL_BLOCKS = 1024
REPS = 20


def sender(addr: str, cases: list[list[int]]) -> None:
    pool = torch.ones(POOL_BLOCKS, BLOCK_NBYTES, dtype=torch.uint8)
    sock = zmq.Context().socket(zmq.PAIR)
    sock.connect(addr)
    for ids in cases:
        for _ in range(REPS):
            sock.recv()
            _, frames = block_frames(pool, ids)
            sock.send_multipart([b"h", *frames], copy=False)


def main() -> None:
    print("| transport | prompt tokens | blocks | MiB | layout | ms / request | GB/s |")
    print("|---|---|---|---|---|---|---|")
    pool = torch.zeros(POOL_BLOCKS, BLOCK_NBYTES, dtype=torch.uint8)
    for transport in ("tcp", "ipc"):
        for tokens in (512, 4096):
            n = tokens // BLOCK_TOKENS
            cases = {"scattered": list(range(0, 2 * n, 2)), "contiguous": list(range(n))}
            addr = "tcp://127.0.0.1:5790" if transport == "tcp" else "ipc:///tmp/baton-kvbench"
            sock = zmq.Context().socket(zmq.PAIR)
            sock.bind(addr)
            proc = mp.get_context("spawn").Process(target=sender, args=(addr, list(cases.values())))
            proc.start()
            for layout in cases:
                dst = list(range(2 * n - 1, -1, -2))  # the receiver's own scattered blocks
                times = []
                for _ in range(REPS):
                    t = time.perf_counter()
                    sock.send(b"pull")
                    frames = sock.recv_multipart(copy=False)[1:]
                    write_blocks(pool, [f.buffer for f in frames], dst)
                    times.append(time.perf_counter() - t)
                ms = statistics.median(times) * 1e3
                mib = n * BLOCK_NBYTES / 2**20
                print(
                    f"| zmq-{transport} | {tokens} | {n} | {mib:.1f} | {layout} | {ms:.2f} | {n * BLOCK_NBYTES / ms / 1e6:.2f} |",
                    flush=True,
                )
            proc.join()
            sock.close()


if __name__ == "__main__":
    main()
