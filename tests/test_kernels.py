"""Each Triton kernel, run by Triton's CPU interpreter, against its torch reference; then the
engine's greedy tokens against transformers with every op on the Triton path.

The kernels run in one spawned process (the `interpreted` fixture) that sets TRITON_INTERPRET
before anything imports triton. There every output is allocated NaN-filled (torch's
deterministic mode fills torch.empty), so an element a kernel fails to write fails the test.
The interpreter runs the programs of a grid one after another in numpy, so sizes stay small
(at most 6 sequences, 107 tokens, 16 query heads). bf16 attention is not run here: the
interpreter's tl.dot is wrong for bf16 inputs; benchmarks/kernels_bench.py checks it on a GPU.
"""

import multiprocessing
import os
import random
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from reference import assert_close, packed_or_skip
from test_engine_exact import hf_greedy, prompts

import baton
from baton import kernels
from baton.kernels import (
    greedy,
    greedy_native,
    kv_write,
    kv_write_native,
    kv_write_triton,
    linear_native,
    native,
    norm,
    norm_native,
    norm_triton,
    paged_attention,
    paged_attention_native,
    paged_attention_triton,
    rotary,
    rotary_native,
    rotary_triton,
)
from baton.sampling_params import SamplingParams


def _start_interpreter() -> None:
    torch.use_deterministic_algorithms(True)  # torch.empty now fills floats with NaN
    # numpy warns about lanes that are masked off and never stored (0/0 past a sequence's end)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")


def _call(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    """Runs in the interpreter process; returns the arguments too, for in-place kernels."""
    return fn(*args, **kwargs), args


@pytest.fixture(scope="module")
def interpreted() -> Iterator[Callable]:
    """Calls a function in a process where Triton runs on its CPU interpreter. Triton picks
    interpreter or compiler as @triton.jit decorates (triton.language's own helpers on its first
    import), and this process may have imported it already: torch does, with transformers."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")  # a spawned process starts with this environment
        pool = multiprocessing.get_context("spawn").Pool(1, initializer=_start_interpreter)
    with pool:
        yield lambda fn, *args, **kwargs: pool.apply(_call, (fn, args, kwargs))


@pytest.fixture(autouse=True)
def fresh_inputs() -> None:
    seed = random.randrange(2**32)
    print(f"torch seed {seed}")  # pytest shows it when the test fails
    torch.manual_seed(seed)


# attention sums over head_dim and the context in another order than torch's matmuls: the
# largest gap seen is ~17 ulps (fp32, head_dim 128, 100 keys)
ATTENTION_ULPS = 64


def paged_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype):
    """Layer 1's K and V views of a block-major pool with 2 layers, as baton/cache/kv_cache.py
    lays it out: neither view is contiguous."""
    data = torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim).to(dtype)
    return data[:, 1, 0], data[:, 1, 1]


def block_tables(ctx_lens: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    """Each sequence's blocks, scattered over the pool. Rows are as wide as the longest
    sequence's; the entries past a shorter one's end are other sequences' blocks."""
    width = max(-(-n // block_size) for n in ctx_lens)
    ids = torch.randperm(num_blocks)[: len(ctx_lens) * width]
    return ids.view(len(ctx_lens), width)


def at_and_across_blocks(block_size: int) -> list[int]:
    return [1, block_size - 1, block_size, block_size + 1, 3 * block_size, 5 * block_size + 2]


# (GQA ratio, head_dim, block_size): every ratio with both head dims; block sizes 16, a
# non-power of two, and 4 (what the engine tests use)
ATTENTION_CASES = [(1, 64, 16), (1, 128, 12), (3, 64, 4), (3, 128, 16), (8, 64, 12), (8, 128, 16)]
KV_HEADS = 2
NUM_BLOCKS = 128  # enough for the longest lengths below in blocks of 4


@pytest.mark.parametrize("partition_size", [16, None], ids=["split-k", "one-partition"])
@pytest.mark.parametrize(("group", "head_dim", "block_size"), ATTENTION_CASES)
def test_paged_decode_attention(interpreted, group, head_dim, block_size, partition_size):
    ctx_lens = at_and_across_blocks(block_size)
    k_cache, v_cache = paged_cache(NUM_BLOCKS, block_size, KV_HEADS, head_dim, torch.float32)
    tables = block_tables(ctx_lens, block_size, NUM_BLOCKS)
    q = torch.randn(len(ctx_lens), KV_HEADS * group, head_dim)
    args = (q, k_cache, v_cache, tables, torch.tensor(ctx_lens), head_dim**-0.5)
    got, _ = interpreted(
        paged_attention_triton.paged_decode_attention, *args, partition_size=partition_size
    )
    assert_close(got, paged_attention.paged_decode_attention(*args), ATTENTION_ULPS)


@pytest.mark.parametrize(("group", "head_dim", "block_size"), ATTENTION_CASES)
def test_extend_attention_varlen(interpreted, group, head_dim, block_size):
    # (cached, new) per sequence: a whole prompt; new tokens from a block boundary; a cached
    # prefix ending mid-block; 70 new tokens span two 64-row query tiles
    cached_new = [(0, 17), (block_size, block_size), (block_size - 1, 3), (2 * block_size + 5, 70)]
    ctx_lens = [c + n for c, n in cached_new]
    k_cache, v_cache = paged_cache(NUM_BLOCKS, block_size, KV_HEADS, head_dim, torch.float32)
    tables = block_tables(ctx_lens, block_size, NUM_BLOCKS)
    cu_seqlens = torch.tensor([0, *torch.tensor([n for _, n in cached_new]).cumsum(0).tolist()])
    q = torch.randn(int(cu_seqlens[-1]), KV_HEADS * group, head_dim)
    args = (q, k_cache, v_cache, tables, cu_seqlens, torch.tensor(ctx_lens), 70, head_dim**-0.5)
    got, _ = interpreted(paged_attention_triton.extend_attention_varlen, *args)
    assert_close(got, paged_attention.extend_attention_varlen(*args), ATTENTION_ULPS)


def dense_attention(q, k_cache, v_cache, table, ctx_len, scale):
    """The spec the torch ops are held to: token t of the sequence read one by one from its
    block, each query head against its KV head, in fp32, causal over positions."""
    bs = k_cache.shape[1]
    k = torch.stack([k_cache[table[t // bs], t % bs] for t in range(ctx_len)]).float()
    v = torch.stack([v_cache[table[t // bs], t % bs] for t in range(ctx_len)]).float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [ctx, q_heads, d]
    scores = torch.einsum("nhd,chd->hnc", q.float(), k) * scale
    query_pos = torch.arange(ctx_len - q.shape[0], ctx_len).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(ctx_len) > query_pos, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


def test_loading_the_native_kernels_keeps_subnormal_floats():
    """A library linked with -ffast-math sets flush-to-zero for the whole process as it loads;
    hypothesis (and any numerics after it) then break. Ours is compiled fast, linked plain."""
    tiny = 5e-324  # the smallest subnormal double
    assert native.load() is not None
    assert tiny * 1.0 == tiny
    assert torch.tensor(1e-40) * 1.0 > 0  # float32 subnormal, through torch's kernels too


def test_without_a_working_compiler_the_torch_ops_serve(tmp_path):
    env = {**os.environ, "CC": "false", "BATON_CACHE": str(tmp_path)}  # `false` fails any build
    probe = "from baton import kernels; kernels.use('auto'); print(kernels.BACKEND, kernels.paged_decode_attention.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["torch", "baton.kernels.paged_attention"]
    assert "the kernels run on torch" in out.stderr


def test_a_kernel_cache_others_can_write_is_not_loaded(tmp_path):
    # the library is code every service runs: a cache another user could fill is refused
    (tmp_path / "kernels").mkdir(mode=0o777)
    (tmp_path / "kernels").chmod(0o777)  # past the umask
    env = {**os.environ, "BATON_CACHE": str(tmp_path)}
    probe = "from baton import kernels; kernels.use('auto'); print(kernels.BACKEND)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["torch"]
    assert "is not a private directory" in out.stderr
    assert list((tmp_path / "kernels").iterdir()) == []  # nothing built there either


def test_without_openmp_the_native_kernels_still_build_and_run_serial(tmp_path):
    cc = tmp_path / "cc-without-openmp"  # a compiler that knows no -fopenmp, as Apple's clang
    cc.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "no -fopenmp" >&2; exit 1; }; done\n'
        'exec cc "$@"\n'
    )
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "BATON_CACHE": str(tmp_path)}
    probe = "from baton import kernels; kernels.use('auto'); print(kernels.BACKEND, kernels.paged_decode_attention.__module__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["native", "baton.kernels.paged_attention_native"]
    assert "the kernels run serial" in out.stderr


@pytest.mark.parametrize("ops", [paged_attention, paged_attention_native], ids=["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "head_dim", "block_size"), ATTENTION_CASES)
def test_cpu_attention_matches_the_dense_spec(group, head_dim, block_size, dtype, ops):
    # the CPU serving paths: torch gathers whole blocks and attends in chunks of queries; the
    # native (C) ops read each sequence's blocks in place, extend (bf16) in tiles of 8 query
    # rows against 32 keys at a time: 17 x 3 rows leave a part tile, the 100-token sequence
    # spans 5 chunks of keys with its cached prefix ending mid-chunk
    cached_new = [(0, 17), (block_size, 1), (block_size - 1, 3), (2 * block_size + 5, 100)]
    ctx_lens = [c + n for c, n in cached_new]
    k_cache, v_cache = paged_cache(NUM_BLOCKS, block_size, KV_HEADS, head_dim, dtype)
    tables = block_tables(ctx_lens, block_size, NUM_BLOCKS)
    scale = head_dim**-0.5
    # bf16: inputs are rounded once, scores once, probabilities once (a few ulps of 1/256)
    atol = rtol = 1e-5 if dtype == torch.float32 else 3e-2
    qs = [torch.randn(n, KV_HEADS * group, head_dim).to(dtype) for _, n in cached_new]
    cu_seqlens = torch.tensor([0, *torch.tensor([n for _, n in cached_new]).cumsum(0).tolist()])
    got = ops.extend_attention_varlen(
        torch.cat(qs), k_cache, v_cache, tables, cu_seqlens, torch.tensor(ctx_lens), 100, scale
    )
    want = torch.cat(
        [
            dense_attention(q, k_cache, v_cache, t, c, scale)
            for q, t, c in zip(qs, tables, ctx_lens, strict=True)
        ]
    )
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    q = torch.stack([q[-1] for q in qs])  # the last token of each, as decoding reads it
    got = ops.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(ctx_lens), scale)
    want = torch.cat(
        [
            dense_attention(q[i : i + 1], k_cache, v_cache, tables[i], c, scale)
            for i, c in enumerate(ctx_lens)
        ]
    )
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


# a sliding layer's window: ending mid-block, one position, wider than every context; and
# Gemma 2's soft-cap, low enough to bend these scores, alone and with a window
ATTENTION_OPTIONS = {
    "whole": {},
    "window7": {"window": 7},
    "window1": {"window": 1},
    "window-wide": {"window": 4096},
    "softcap": {"softcap": 0.5},
    "window-softcap": {"window": 11, "softcap": 2.0},
}


@pytest.mark.parametrize("options", ATTENTION_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("group", "head_dim", "block_size"), [(3, 64, 5), (3, 128, 32), (4, 32, 16), (3, 80, 16)]
)
def test_native_decode_attention_any_block_or_head_size(
    group, head_dim, block_size, dtype, options
):
    # the C kernel's AVX-512 path scores 16 keys and weighs 2 values at a time, head_dim in
    # 32s: odd blocks leave a lone value row, blocks of 32 two runs of keys, 3 heads of 128
    # dims two passes over the values (2 heads' sums fill the registers), and head_dim 80 (not
    # a multiple of 32) takes the plain C loops; a window starts it mid-block
    ctx_lens = at_and_across_blocks(block_size)
    k_cache, v_cache = paged_cache(NUM_BLOCKS, block_size, KV_HEADS, head_dim, dtype)
    tables = block_tables(ctx_lens, block_size, NUM_BLOCKS)
    q = torch.randn(len(ctx_lens), KV_HEADS * group, head_dim).to(dtype)
    args = (q, k_cache, v_cache, tables, torch.tensor(ctx_lens), head_dim**-0.5)
    got = paged_attention_native.paged_decode_attention(*args, **ATTENTION_OPTIONS[options])
    want = paged_attention.paged_decode_attention(*args, **ATTENTION_OPTIONS[options])
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # as in test_cpu_attention_matches_...
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("options", ATTENTION_OPTIONS)
@pytest.mark.parametrize(("group", "head_dim", "block_size"), [(3, 64, 16), (1, 128, 12)])
def test_native_extend_attention_windows_and_soft_caps(group, head_dim, block_size, options):
    # the C extend kernel (bf16) starts each tile at the first chunk of 32 keys its earliest
    # row sees and masks each row's window within it; prompts with and without a cached
    # prefix longer than the window, a chunk of one token, one of 100
    cached_new = [(0, 17), (40, 1), (block_size - 1, 3), (2 * block_size + 5, 100), (70, 30)]
    ctx_lens = [c + n for c, n in cached_new]
    k_cache, v_cache = paged_cache(NUM_BLOCKS, block_size, KV_HEADS, head_dim, torch.bfloat16)
    tables = block_tables(ctx_lens, block_size, NUM_BLOCKS)
    q = torch.randn(sum(n for _, n in cached_new), KV_HEADS * group, head_dim).bfloat16()
    cu_seqlens = torch.tensor([0, *torch.tensor([n for _, n in cached_new]).cumsum(0).tolist()])
    args = (q, k_cache, v_cache, tables, cu_seqlens, torch.tensor(ctx_lens), 100, head_dim**-0.5)
    got = paged_attention_native.extend_attention_varlen(*args, **ATTENTION_OPTIONS[options])
    want = paged_attention.extend_attention_varlen(*args, **ATTENTION_OPTIONS[options])
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "head_dim"), [(1, 128), (3, 64)])
def test_write_kv_writes_only_its_slots(interpreted, kv_heads, head_dim, dtype):
    k_cache, v_cache = paged_cache(8, 16, kv_heads, head_dim, dtype)
    k_cache.fill_(float("nan"))  # fills both: they share one pool
    slots = torch.randperm(8 * 16)[:21]  # distinct, scattered over blocks
    k, v = (torch.randn(21, 2 * kv_heads, head_dim).to(dtype)[:, ::2] for _ in "kv")  # strided
    args = (k_cache, v_cache, k, v, slots // 16, slots % 16)
    _, (got_k, got_v, *_) = interpreted(kv_write_triton.write_kv, *args)
    native_k, native_v = k_cache.clone(), v_cache.clone()
    kv_write_native.write_kv(native_k, native_v, *args[2:])
    kv_write.write_kv(*args)
    for got in (got_k, native_k):  # a copy: exact, and NaN wherever nothing was written
        assert_close(got, k_cache, ulps=0)
    for got in (got_v, native_v):
        assert_close(got, v_cache, ulps=0)


def test_native_write_kv_refuses_a_slot_outside_the_pool():
    k_cache, v_cache = paged_cache(4, 16, 2, 64, torch.float32)
    k_cache.zero_(), v_cache.zero_()
    k = v = torch.ones(2, 2, 64)
    for blocks, offsets in (([0, 4], [0, 0]), ([0, 1], [3, 16]), ([-1, 0], [0, 0])):
        with pytest.raises(IndexError, match="4 blocks of 16"):
            kv_write_native.write_kv(
                k_cache, v_cache, k, v, torch.tensor(blocks), torch.tensor(offsets)
            )
        assert not k_cache.any() and not v_cache.any()  # the first, valid slot not written either


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_add_rms_norm(interpreted, hidden, dtype):
    x, residual = torch.randn(7, hidden).to(dtype), torch.randn(7, hidden).to(dtype)
    weight = torch.randn(hidden).to(dtype)
    got, _ = interpreted(norm_triton.add_rms_norm, x, residual, weight, 1e-6)
    # Triton's CPU interpreter truncates fp32 to bf16 where a GPU rounds to nearest: up to 1 ulp
    # at each of the kernel's three roundings (with the interpreter's casts rounding to nearest,
    # bf16 matches the reference bit for bit)
    ulps = 4 if dtype == torch.bfloat16 else 2  # fp32: the sum of squares in another order
    for g, w in zip(got, norm.add_rms_norm(x, residual, weight, 1e-6), strict=True):
        assert_close(g, w, ulps=ulps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [7, 64])  # 64 x 576 rows run on OpenMP threads
def test_native_add_rms_norm(rows, dtype):
    x, residual = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    got = norm_native.add_rms_norm(x, residual, weight, 1e-5)
    want = norm.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(got[1], want[1])  # the residual sum: one rounding either way
    # bf16: the sum of squares in another order moves an output by an ulp, rarely; fp32 is
    # the reference itself
    assert_close(got[0], want[0], ulps=1 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 1000, 49152])
def test_native_argmax_is_torch_argmax(cols):
    rows = torch.randn(12, cols)
    rows[1] = 7.0  # all equal: the first
    rows[2] = float("-inf")
    rows[3, cols // 2 :] = rows[3].max() + 1  # ties in other lanes: the first of them
    rows[4, -1] = float("inf")
    rows[5, cols // 3] = float("nan")  # a NaN wins, before or after the largest number
    rows[5, -1] = 1e30
    rows[6, cols - 1] = float("nan")
    rows[7, [0, cols - 1]] = float("nan")
    rows[8] = -0.0
    rows[8, cols // 2] = 0.0  # equal to -0.0: the first index stays
    assert torch.equal(greedy_native.argmax(rows), rows.argmax(-1))


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000, 49152])
def test_native_token_bitmask_is_the_torch_one(vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab)
    words = (vocab + 31) // 32
    mask = torch.randint(-(2**31), 2**31, (3, words), dtype=torch.int32)  # bit 31 in play
    mask[1] = -1  # everything allowed
    mask[2, : words // 2] = 0  # a run of words banned whole
    rows = torch.tensor([4, 0, 2])
    want = logits.clone()
    greedy.apply_token_bitmask(want, mask, rows)
    got = logits.clone()
    greedy_native.apply_token_bitmask(got, mask, rows)
    assert torch.equal(got, want)
    assert torch.equal(want[[1, 3, 5]], logits[[1, 3, 5]])  # rows not named stay
    assert torch.equal(want[0], logits[0])  # all allowed
    short = logits.clone()  # a mask narrower than the vocabulary bans the tokens past it
    greedy_native.apply_token_bitmask(short, mask[:, : max(words - 1, 0)], rows)
    assert torch.isinf(short[4, (words - 1) * 32 :]).all()


def packed_bf16(weight: torch.Tensor) -> torch.Tensor:
    return packed_or_skip(linear_native.pack(weight), "AVX-512 BF16 and no AMX")


# rows: one, a part tile, a tile (8), tiles and a part; out: one vector (16), a part vector,
# a strip (48) and a part strip; in: pairs of inputs, not a multiple of 16
@pytest.mark.parametrize("rows", [1, 5, 8, 70])
@pytest.mark.parametrize("out_features", [16, 40, 150])
@pytest.mark.parametrize("bias", [False, True])
def test_native_linear_is_the_fp32_sum_rounded_once(rows, out_features, bias):
    in_features = 70
    x = torch.randn(rows, in_features).bfloat16()
    weight = torch.randn(out_features, in_features).bfloat16()
    b = torch.randn(out_features).bfloat16() if bias else None
    got = linear_native.linear(x, packed_bf16(weight), b, out_features)
    want = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    # fp32 sums in another order than torch's, then one rounding: within one bf16 ulp
    assert_close(got, want.bfloat16(), ulps=1)
    assert got.shape == (rows, out_features)


def test_native_linear_row_does_not_depend_on_its_batch():
    # +-2^20 first and last: the rest is summed at 2^20's fp32 precision and then uncovered,
    # so a sum in any other order comes out another bf16 value
    x, weight = torch.randn(21, 576), torch.randn(100, 576)
    x[:, 0], x[:, -1], weight[:, 0], weight[:, -1] = 2.0**20, -(2.0**20), 1, 1
    x, weight = x.bfloat16(), weight.bfloat16()
    packed = packed_bf16(weight)
    batched = linear_native.linear(x, packed, None, 100)
    for i in range(21):  # alone, in another tile, at another position in its tile
        assert torch.equal(linear_native.linear(x[i : i + 1], packed, None, 100)[0], batched[i])
        assert torch.equal(linear_native.linear(x[i:], packed, None, 100)[0], batched[i])


def test_native_linear_declines_what_it_cannot_run():
    assert linear_native.pack(torch.randn(16, 7).bfloat16()) is None  # inputs come in pairs
    assert linear_native.pack(torch.randn(16, 8)) is None  # fp32 stays on torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_apply_rotary(interpreted, head_dim, dtype):
    q_heads, kv_heads, max_position = 6, 2, 100
    inv_freq = 1e4 ** -(torch.arange(0, head_dim, 2) / head_dim)
    angles = torch.outer(torch.arange(max_position).float(), inv_freq).repeat(1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    # q and k as the model has them: strided views into one fused qkv projection
    qkv = torch.randn(9, (q_heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.unflatten(-1, (q_heads, head_dim)), k.unflatten(-1, (kv_heads, head_dim))
    positions = torch.randint(0, max_position, (9,))
    want = rotary.apply_rotary(q, k, positions, cos, sin)
    got, _ = interpreted(rotary_triton.apply_rotary, q, k, positions, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, ulps=2)  # the reference rounds each product, the kernel once
    got = rotary_native.apply_rotary(q, k, positions, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # the C kernel rounds as the reference does


def greedy_on_the_triton_path(
    model_dir: str, token_lists: list[list[int]], max_tokens: int
) -> list[list[int]]:
    kernels.use("triton")
    ops = [kernels.write_kv, kernels.add_rms_norm, kernels.apply_rotary]
    ops += [kernels.extend_attention_varlen, kernels.paged_decode_attention]
    assert all(op.__module__.endswith("_triton") for op in ops)
    # chunked prefill over blocks of 4, then mixed prefill and decode batches
    llm = baton.LLM(
        model_dir, dtype="float32", block_size=4, num_blocks=32, max_num_batched_tokens=8
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(token_lists, params)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_matches_transformers_on_the_triton_path(interpreted, tiny_llama):
    token_lists = prompts(512, [5, 11, 17])  # 3 prompts, 6 tokens: the interpreter is slow
    got, _ = interpreted(greedy_on_the_triton_path, str(tiny_llama), token_lists, 6)
    assert got == hf_greedy(tiny_llama, token_lists, 6)
