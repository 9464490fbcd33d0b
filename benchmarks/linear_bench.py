"""The bf16 projections of one SmolLM2 step: oneDNN (its prepacked layout, what the model used
before) beside the C linear layer (kernels/linear_native.py), with bf16 and with int8 weights,
ms a step for each row count, and the int8 step's share of its own weight-read bound (its
bytes over the copy bandwidth the same threads reach). A step: 30 layers of qkv, o, gate+up and
down, then the 49,152-row lm_head once. The weights together (~270 MB bf16, ~135 MB int8) do
not fit any cache, as in the engine.

    python -m baton.benchmarks.linear_bench [--rows 1 8 32 64 512] [--threads 2]
"""

import argparse

import torch

from baton.benchmarks.cpu_attention_bench import median_ms
from baton.benchmarks.engine_bench import bandwidth_gbs
from baton.kernels import linear_native

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 64, 512])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(s, dtype=torch.bfloat16) for _ in range(LAYERS) for s in SHAPES.values()]
    weights.append(torch.randn(LM_HEAD, dtype=torch.bfloat16))
    packed = [linear_native.pack(w) for w in weights]
    if packed[0] is None:
        raise SystemExit(
            "the C linear layer does not serve on this CPU (see kernels/csrc/linear.c)"
        )
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
    quantized = [linear_native.quantize_int8(w) for w in weights]
    int8 = [linear_native.pack_int8(q, scale) for q, scale in quantized]
    int8_bytes = sum(p.numel() + s.numel() * s.element_size() for p, s in int8)
    int8_bound_ms = int8_bytes / bandwidth_gbs() / 1e6
    flops_per_row = 2 * sum(w.numel() for w in weights)
    print(f"{args.threads} threads, int8 weight-read bound {int8_bound_ms:.2f} ms\n")
    print("| rows | oneDNN ms | C ms | speed-up | C GFLOP/s | C int8 ms | int8 / bf16 | of bound |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (576, 1536)}
            ref = [
                lambda w=w, p=p, xs=xs: torch.ops.mkldnn._linear_pointwise(
                    xs[w.shape[1]], p, None, "none", [], ""
                )
                for w, p in zip(weights, onednn, strict=True)
            ]
            ours = [
                lambda w=w, p=p, xs=xs: linear_native.linear(xs[w.shape[1]], p, None, w.shape[0])
                for w, p in zip(weights, packed, strict=True)
            ]
            eights = [
                lambda w=w, p=p, s=s, xs=xs: linear_native.linear(
                    xs[w.shape[1]], p, None, w.shape[0], s
                )
                for w, (p, s) in zip(weights, int8, strict=True)
            ]
            # one step: every projection in model order; the median of 5
            a, b, c = (
                median_ms(lambda fns=fns: [fn() for fn in fns], 5) for fns in (ref, ours, eights)
            )
            rate = flops_per_row * rows / b / 1e6
            print(
                f"| {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {rate:,.0f} | {c:.2f} "
                f"| {b / c:.2f}x | {int8_bound_ms / c:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
