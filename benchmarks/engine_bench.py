"""Engine throughput on SmolLM2: baton.LLM beside transformers and the memory roofline.

    python -m baton.benchmarks.engine_bench [--dtypes bfloat16 float32] [--batches 1 8 32 64]
        [--prefill-lens 512 4096] [--quantization int8]

Prefill: one prompt of each length (512 by default), tokens/s (best of 3), in steps of up to
2,048 tokens (the budget below). Decode: `batch` prompts of 128 tokens, 64 new tokens each;
tokens/s over the decode steps only (after every first token), beside transformers `generate`
on the same prompts (its prefill subtracted). Roofline: the bytes of the projections' weights (as
the engine holds them: int8 with --quantization int8) / measured copy bandwidth per decode
step, times the batch (issue 2's definition); compute bound:
the step's projection FLOPs / the FLOP/s the engine's own Linear reaches on a large matmul. The
lower of the two is what a step could at best take.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

import baton
from baton.model.files import resolve_model_dir
from baton.model.linear import Linear
from baton.request import Sequence

NEW = 64


def bandwidth_gbs() -> float:
    # written first: untouched pages all map the kernel's one zero page, which reads from cache
    src = torch.ones(256 * 2**20, dtype=torch.uint8)
    dst = torch.ones_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best / 1e9  # read + write


def weight_bytes(m: Linear) -> int:
    """What a projection reads a step: its packed int8 weight, or its float one."""
    if m.scale is not None:
        q = m.packed if m.native else m.qweight
        return q.numel() + m.scale.numel() * m.scale.element_size()
    return m.weight.numel() * m.weight.element_size()


def peak_flops(dtype: torch.dtype, like: Linear) -> float:
    """FLOP/s of the engine's Linear (quantized or prepacked as the model's `like` is) on a
    1024-row matmul at SmolLM2's widest shape: the most its projections can reach here."""
    layer = Linear(576, 3072, bias=False).to(dtype)
    if like.scale is not None:
        layer.quantize()
    elif like.packed is not None:
        layer.prepack()
    x = torch.randn(1024, 576, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(5):
            t = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - t)
    return 2 * x.shape[0] * layer.in_features * layer.out_features / best


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def baton_decode(llm, batch: int, vocab: int) -> float:
    params = baton.SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts(batch, 128, vocab)):
        llm.scheduler.add(Sequence(f"b{i}", ids, params))
    seqs = list(llm.scheduler.waiting)
    while any(s.num_output_tokens == 0 for s in seqs):
        llm.step({})
    t = time.perf_counter()
    while llm.scheduler.has_work:
        llm.step({})
    return batch * (NEW - 1) / (time.perf_counter() - t)


def hf_decode(hf, batch: int, vocab: int) -> float:
    x = torch.tensor(prompts(batch, 128, vocab))
    mask = torch.ones_like(x)
    with torch.inference_mode():
        t = time.perf_counter()
        hf(x, attention_mask=mask)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(x, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        total = time.perf_counter() - t
    return batch * (NEW - 1) / (total - prefill)


def prefill_rate(fn, length: int, vocab: int) -> float:
    """Best of 3, a fresh prompt each time (a repeat would be a prefix-cache hit)."""
    best = float("inf")
    for seed in range(1, 4):
        (prompt,) = prompts(1, length, vocab, seed)
        t = time.perf_counter()
        fn(prompt)
        best = min(best, time.perf_counter() - t)
    return length / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--prefill-lens", nargs="+", type=int, default=[512])
    ap.add_argument(
        "--quantization", choices=["int8"], help="Baton's weights (transformers': dtype)"
    )
    args = ap.parse_args()
    model_dir = resolve_model_dir(None)
    gbs = bandwidth_gbs()
    print(f"threads {torch.get_num_threads()}, copy bandwidth {gbs:.1f} GB/s\n")
    print(
        "| dtype | what | baton tok/s | transformers tok/s | ratio | roofline tok/s | of roofline "
        "| compute bound tok/s | of the lower bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        llm = baton.LLM(
            str(model_dir),
            dtype=dtype,
            num_blocks=4096,
            max_num_seqs=128,
            max_num_batched_tokens=2048,
            quantization=args.quantization,
        )
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        vocab = llm.engine.model.args.vocab_size
        model = llm.engine.model
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        step_s = sum(map(weight_bytes, linears)) / (gbs * 1e9)
        # per sequence per step: every projection's weights once, multiply and add
        flops = 2 * sum(m.in_features * m.out_features for m in linears)
        peak = peak_flops(getattr(torch, dtype), model.lm_head)
        label = f"{dtype}, weights {args.quantization}" if args.quantization else dtype
        print(f"{label}: Linear peak {peak / 1e9:,.0f} GFLOP/s\n")
        one = baton.SamplingParams(max_tokens=1, temperature=0)
        for n in args.prefill_lens:
            b = prefill_rate(lambda p: llm.generate([p], one), n, vocab)  # noqa: B023
            with torch.inference_mode():
                h = prefill_rate(lambda p: hf(torch.tensor([p])), n, vocab)  # noqa: B023
            print(f"| {label} | prefill {n} | {b:,.0f} | {h:,.0f} | {b / h:.2f} | | | | |")
        for batch in args.batches:
            b = baton_decode(llm, batch, vocab)
            h = hf_decode(hf, batch, vocab)
            roof, bound = batch / step_s, peak / flops
            print(
                f"| {label} | decode batch {batch} | {b:,.0f} | {h:,.0f} | {b / h:.2f} "
                f"| {roof:,.0f} | {b / roof:.0%} | {bound:,.0f} | {b / min(roof, bound):.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
