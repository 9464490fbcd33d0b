"""Each Triton kernel against its torch reference on a CUDA GPU, at Llama-3-8B shapes in bf16
(32 query heads, 8 KV heads, head_dim 128, hidden 4096, blocks of 16 tokens).

    python -m baton.benchmarks.kernels_bench

Each kernel's output is first checked against the reference; times are medians of
triton.testing.do_bench. GB/s counts the bytes an op must move at least (inputs read once,
outputs written once); TFLOP/s counts the attention matmuls (causal: only the visible keys).
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from triton.testing import do_bench

from baton.kernels import (
    kv_write,
    kv_write_triton,
    norm,
    norm_triton,
    paged_attention,
    rotary,
    rotary_triton,
)
from baton.kernels import paged_attention_triton as pat

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK = 32, 8, 128, 4096, 16
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16


@dataclass
class Case:
    name: str
    triton_fn: Callable
    torch_fn: Callable
    args: tuple
    num_bytes: int
    num_flops: int = 0


def paged(num_tokens_per_seq: list[int]):
    """A block-major pool with 2 layers (so the views are strided, as in serving), its block
    tables and the per-sequence lengths, all on the GPU."""
    widths = [-(-n // BLOCK) for n in num_tokens_per_seq]
    num_blocks = len(widths) * max(widths)
    data = torch.randn(num_blocks, 2, 2, BLOCK, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").view(len(widths), max(widths))
    lens = torch.tensor(num_tokens_per_seq, device="cuda")
    return data[:, 0, 0], data[:, 0, 1], tables, lens


def cases() -> list[Case]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=DTYPE, device="cuda")

    out: list[Case] = []
    t = 4096  # tokens in one prefill step
    k_cache, v_cache, _, _ = paged([t])
    slots = torch.randperm(k_cache.shape[0] * BLOCK, device="cuda")[:t]
    args = (k_cache, v_cache, randn(t, KV_HEADS, HEAD_DIM), randn(t, KV_HEADS, HEAD_DIM))
    args += (slots // BLOCK, slots % BLOCK)
    kv_bytes = 2 * t * KV_HEADS * HEAD_DIM * ELEM
    out.append(Case("write_kv", kv_write_triton.write_kv, kv_write.write_kv, args, 2 * kv_bytes))

    args = (randn(t, HIDDEN), randn(t, HIDDEN), randn(HIDDEN), 1e-5)
    norm_bytes = 4 * t * HIDDEN * ELEM  # x and residual in, normed and sum out
    out.append(Case("add_rms_norm", norm_triton.add_rms_norm, norm.add_rms_norm, args, norm_bytes))

    angles = torch.rand(8192, HEAD_DIM, device="cuda") * 6.28
    q, k = randn(t, HEADS, HEAD_DIM), randn(t, KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 8192, (t,), device="cuda")
    args = (q, k, positions, angles.cos().to(DTYPE), angles.sin().to(DTYPE))
    rope_bytes = 2 * (q.numel() + k.numel()) * ELEM + 2 * t * HEAD_DIM * ELEM
    out.append(
        Case("apply_rotary", rotary_triton.apply_rotary, rotary.apply_rotary, args, rope_bytes)
    )

    for batch, ctx in ((64, 2048), (4, 32768)):  # the second needs split-K to fill the GPU
        k_cache, v_cache, tables, lens = paged([ctx] * batch)
        args = (randn(batch, HEADS, HEAD_DIM), k_cache, v_cache, tables, lens, HEAD_DIM**-0.5)
        num_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * ELEM
        flops = 4 * batch * HEADS * ctx * HEAD_DIM
        name = f"decode B={batch} ctx={ctx}"
        ref = paged_attention.paged_decode_attention
        out.append(Case(name, pat.paged_decode_attention, ref, args, num_bytes, flops))

    num_seqs, cached, new = 8, 1024, 512  # chunked prefill over a cached prefix
    k_cache, v_cache, tables, lens = paged([cached + new] * num_seqs)
    cu_seqlens = torch.arange(0, (num_seqs + 1) * new, new, device="cuda")
    q = randn(num_seqs * new, HEADS, HEAD_DIM)
    args = (q, k_cache, v_cache, tables, cu_seqlens, lens, new, HEAD_DIM**-0.5)
    num_bytes = 2 * (q.numel() + 2 * num_seqs * (cached + new) * KV_HEADS * HEAD_DIM) * ELEM
    visible_keys = num_seqs * (new * cached + new * (new + 1) // 2)
    flops = 4 * HEADS * HEAD_DIM * visible_keys
    name = f"extend {num_seqs}x{new} on {cached}"
    ref = paged_attention.extend_attention_varlen
    out.append(Case(name, pat.extend_attention_varlen, ref, args, num_bytes, flops))
    return out


def strided_copy(x: object) -> object:
    """A copy that keeps the strides (the kernels are checked on the strided cache views)."""
    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)


def as_tuple(x: object) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("kernels_bench needs a CUDA GPU: the Triton kernels compile only for one")
    print(f"{torch.cuda.get_device_name()}, bf16")
    print("| op | triton ms | torch ms | speed-up | triton GB/s | triton TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for c in cases():
        a, b = (tuple(map(strided_copy, c.args)) for _ in "ab")
        got, want = c.triton_fn(*a), c.torch_fn(*b)
        if got is None:  # write_kv answers in its arguments
            got, want = a, b
        for g, w in zip(as_tuple(got), as_tuple(want), strict=True):
            torch.testing.assert_close(g, w, atol=2**-5, rtol=2**-5)  # a few bf16 roundings
        ms = do_bench(lambda c=c: c.triton_fn(*c.args), return_mode="median")
        ref_ms = do_bench(lambda c=c: c.torch_fn(*c.args), return_mode="median")
        tflops = f"{c.num_flops / ms / 1e9:.1f}" if c.num_flops else "-"
        gbps = c.num_bytes / ms / 1e6
        print(
            f"| {c.name} | {ms:.3f} | {ref_ms:.3f} | {ref_ms / ms:.1f}x | {gbps:.0f} | {tflops} |"
        )


if __name__ == "__main__":
    main()
