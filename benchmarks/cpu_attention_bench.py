"""Attention over the paged KV cache on this CPU: each op the engine binds here beside the
library call it replaced, at SmolLM2 shapes (9 query heads, 3 KV heads, head_dim 64, blocks
of 16 tokens, bf16 and fp32), one thread, the median of 20 calls.

    python -m baton.benchmarks.cpu_attention_bench

decode: one query per sequence (B sequences, contexts given), torch op (kernels/
paged_attention.py) and native C op (kernels/paged_attention_native.py); "mixed" is 19
contexts of ~150 tokens and one of 3,100, where padding to the longest costs the torch op.
extend: a whole prompt attending causally to itself, and a chunk of one after 3,840 cached
tokens: torch op, native C op (bf16; fp32 stays on the torch op) and torch's SDPA on the same
gathered keys and values (what the torch op replaced).
"""

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from baton.kernels import paged_attention, paged_attention_native

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 9, 3, 64, 16, 4096


def median_ms(fn: Callable[[], object], n: int = 20) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def cache(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randn(NUM_BLOCKS, 2, 2, BLOCK, KV_HEADS, HEAD_DIM).to(dtype)
    return data[:, 1, 0], data[:, 1, 1]  # one layer of a block-major pool, as the engine has


def decode_rows(dtype: torch.dtype) -> list[str]:
    k, v = cache(dtype)
    cases = {"1 x 160": [160], "32 x 160": [160] * 32, "64 x 300": [300] * 64}
    cases["mixed 20"] = [3100] + [150 + i for i in range(19)]
    rows = []
    for name, lens in cases.items():
        width = -(-max(lens) // BLOCK)
        tables = torch.randperm(NUM_BLOCKS)[: len(lens) * width].view(len(lens), width)
        args = (torch.randn(len(lens), Q_HEADS, HEAD_DIM).to(dtype), k, v, tables,
                torch.tensor(lens), HEAD_DIM**-0.5)  # fmt: skip
        t = median_ms(lambda a=args: paged_attention.paged_decode_attention(*a))
        c = median_ms(lambda a=args: paged_attention_native.paged_decode_attention(*a))
        rows.append(f"| {dtype} | decode {name} | {t:.3f} | {c:.3f} | | {t / c:.1f}x |")
    return rows


def extend_rows(dtype: torch.dtype) -> list[str]:
    k, v = cache(dtype)
    rows = []
    for cached, n in ((0, 512), (0, 2048), (3840, 256)):
        ctx = cached + n
        table = torch.randperm(NUM_BLOCKS)[: ctx // BLOCK]
        q = torch.randn(n, Q_HEADS, HEAD_DIM).to(dtype)
        args = (q, k, v, table[None], torch.tensor([0, n]), torch.tensor([ctx]), n, 0.125)
        t = median_ms(lambda a=args: paged_attention.extend_attention_varlen(*a), 5)
        c = median_ms(lambda a=args: paged_attention_native.extend_attention_varlen(*a), 5)

        causal = torch.ones(n, ctx, dtype=torch.bool).tril_(cached)

        def sdpa(q=q, table=table, ctx=ctx, causal=causal) -> torch.Tensor:
            kk = paged_attention.gather_blocks(k, table)[:ctx].transpose(0, 1)
            vv = paged_attention.gather_blocks(v, table)[:ctx].transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1), kk, vv, attn_mask=causal, scale=0.125, enable_gqa=True
            )
            return out.transpose(0, 1)

        lib = median_ms(sdpa, 5)
        name = f"extend {n}" + (f" after {cached:,}" if cached else "")
        rows.append(f"| {dtype} | {name} | {t:.3f} | {c:.3f} | {lib:.3f} | {t / c:.1f}x |")
    return rows


def main() -> None:
    torch.set_num_threads(1)
    print("| dtype | case | torch op ms | native ms | torch SDPA ms | native speed-up |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for row in decode_rows(dtype) + extend_rows(dtype):
            print(row, flush=True)


if __name__ == "__main__":
    main()
