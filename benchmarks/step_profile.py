"""Where a decode step's time goes: baton.LLM on SmolLM2, `batch` sequences decoding after
prompts of `context` tokens, the step's wall time beside the time spent in each kernels/ op
(wrapped and timed; the rest is the projections, the MLP's activation, sampling and Python).
Bound: what the step must read (every weight once, every sequence's KV once) over the read
bandwidth of the same threads summing a 256 MB tensor: the least a step could take when
decode is bound by memory, as it is on a CPU (issue 20's target is within 1.5x of it).

    python -m baton.benchmarks.step_profile [--dtype bfloat16] [--kv-dtypes auto int8]
        [--batch 32] [--context 128] [--threads 2]

With several --kv-dtypes, one row each, measured one after the other in one process.
"""

import argparse
import time
from collections import defaultdict

import torch

import baton
from baton import kernels
from baton.benchmarks.engine_bench import prompts
from baton.model.files import resolve_model_dir
from baton.request import Sequence

# a column each; the 8-bit cache's ops count in its 16-bit twin's column
OPS = {
    "paged_decode_attention": ("paged_decode_attention", "paged_decode_attention_int8"),
    "add_rms_norm": ("add_rms_norm",),
    "apply_rotary": ("apply_rotary",),
    "write_kv": ("write_kv", "write_kv_int8"),
}


def read_gbs() -> float:
    x = torch.ones(64 * 2**20)  # 256 MB of fp32, written first so that its pages are real
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kv-dtypes", nargs="+", default=["auto"], choices=["auto", "int8"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.dtype}, batch {args.batch}, context ~{args.context}, {args.threads} threads\n")
    gbs = read_gbs()
    print(f"read bandwidth {gbs:.1f} GB/s\n")
    head = " | ".join(f"{n} ms" for n in OPS)
    print(f"| KV | step ms | bound ms | x bound | {head} | the rest ms |")
    print("|---" * (len(OPS) + 5) + "|")
    for kv_dtype in args.kv_dtypes:
        profile(args, kv_dtype, gbs)


BUDGET = 2048  # prompt tokens a step


def profile(args: argparse.Namespace, kv_dtype: str, gbs: float) -> None:
    # the first prompts decode while the later ones prefill: room for every token they take
    # then, so that the whole batch is still decoding when the steps are timed
    prefill_steps = -(-args.batch * args.context // BUDGET) + args.batch
    new = prefill_steps + 2 * args.steps + 8
    llm = baton.LLM(
        str(resolve_model_dir(None)),
        dtype=args.dtype,
        kv_dtype=kv_dtype,
        num_blocks=args.batch * (-(-(args.context + new + 16) // 16)),
        max_num_seqs=args.batch,
        max_num_batched_tokens=BUDGET,
    )
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(kernels, name) for names in OPS.values() for name in names}
    for column, names in OPS.items():
        for name in names:
            op = getattr(kernels, name)

            def timed(*a, _op=op, _column=column, **kw):
                t = time.perf_counter()
                out = _op(*a, **kw)
                spent[_column] += time.perf_counter() - t
                return out

            setattr(kernels, name, timed)  # callers look ops up on the module at call time
    params = baton.SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    vocab = llm.engine.model.args.vocab_size
    for i, ids in enumerate(prompts(args.batch, args.context, vocab)):
        llm.scheduler.add(Sequence(f"s{i}", ids, params))
    seqs = list(llm.scheduler.waiting)
    while any(s.num_output_tokens == 0 for s in seqs):
        llm.step({})
    for _ in range(args.steps // 2):  # warm up
        llm.step({})
    spent.clear()
    t = time.perf_counter()
    for _ in range(args.steps):
        llm.step({})
    step_ms = (time.perf_counter() - t) / args.steps * 1e3
    assert not any(s.is_finished for s in seqs), "a sequence ended before the timed steps"
    engine = llm.engine
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    per_token = engine.kv.block_nbytes / engine.kv.block_size
    tokens = sum(s.num_tokens for s in seqs) - args.batch * args.steps / 2  # mid-run
    bound_ms = (weights + per_token * tokens) / gbs / 1e6
    for name, op in originals.items():  # unwrapped for the next kv dtype's engine
        setattr(kernels, name, op)
    ops_ms = [spent[n] / args.steps * 1e3 for n in OPS]
    cells = " | ".join(f"{ms:.2f}" for ms in ops_ms)
    rest = step_ms - sum(ops_ms)
    print(
        f"| {kv_dtype} | {step_ms:.2f} | {bound_ms:.2f} | {step_ms / bound_ms:.2f} | {cells} | {rest:.2f} |"
    )


if __name__ == "__main__":
    main()
