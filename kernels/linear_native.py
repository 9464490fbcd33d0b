"""The linear layer in C for a CPU with AVX-512 BF16, its weight in bf16 (kernels/csrc/linear.c;
`F.linear` is the reference; on an AMX CPU oneDNN serves instead) or in int8 with an fp16 scale
per block of 32 inputs of each output column, llama.cpp's Q8_0 (csrc/linear_i8.c, on AVX-512
VNNI; `quantize_int8` makes the pair), the activations then quantized to int8 in the same
blocks as each call begins (`reference_int8`). The
weight is packed once (`pack`, `pack_int8`), then every call multiplies against the packed
copy; each output row is summed in the same order whatever the batch."""

import torch
import torch.nn.functional as F

from baton.kernels import native

COLS = 16  # the packed weight's columns come in runs of this many (csrc/linear.c)
BLOCK = 32  # int8 weights and activations share a scale over this many inputs (linear_i8.c)


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] packed for `linear`, or None where the kernel does not serve: no C
    library, no AVX-512 BF16 (or AMX, where oneDNN is faster), not bf16, an odd `in`."""
    return _pack(weight, torch.bfloat16, "linear_bf16_pack")


def _pack(weight: torch.Tensor, dtype: torch.dtype, c_pack: str) -> torch.Tensor | None:
    lib = native.load()
    if lib is None or weight.dtype != dtype or weight.device.type != "cpu":
        return None
    weight = weight.contiguous()
    out_features, in_features = weight.shape
    if dtype == torch.int8:  # stored as q + 128 for VPDPBUSD, inputs padded to whole blocks
        dtype, in_features = torch.uint8, _padded(in_features)
    packed = torch.empty(-(-out_features // COLS) * COLS * in_features, dtype=dtype)
    if getattr(lib, c_pack)(weight.data_ptr(), out_features, weight.shape[1], packed.data_ptr()):
        return None
    return packed


def _padded(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 as llama.cpp's Q8_0: each output row in blocks of BLOCK inputs (the last
    padded with zeros), each block's scale its largest magnitude over 127 in fp16, and the
    weights divided by that (rounded) scale, rounded to nearest (llama.cpp's quantizer multiplies
    by the unrounded scale's inverse instead). Returns (q [..., out, in] int8, scale [..., out,
    blocks] fp16) for weight [..., out, in]. A Q8_0 tensor dequantized (d x q with max |q| 127
    in each block, as llama.cpp's quantizer writes them) comes back as its own q and d, so a
    Q8_0 GGUF serves its own 8-bit weights (a block whose d is 0 as zeros)."""
    *rows, k = weight.shape
    blocks = F.pad(weight.float(), (0, _padded(k) - k)).reshape(*rows, -1, BLOCK)
    scale = (blocks.abs().amax(dim=-1) / 127).clamp(max=torch.finfo(torch.float16).max).half()
    # a block whose scale is 0 in fp16 (all below ~4e-6) stays 0, not 0 / 0
    inv = torch.where(scale > 0, scale.float(), torch.inf)[..., None]
    q = torch.round(blocks / inv).clamp(-127, 127).to(torch.int8)
    return q.reshape(*rows, -1)[..., :k].contiguous(), scale


def empty_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized room for quantize_int8(weight): (q, scale) of its shapes and dtypes."""
    *rows, k = weight.shape
    return (
        torch.empty(*rows, k, dtype=torch.int8),
        torch.empty(*rows, _padded(k) // BLOCK, dtype=torch.float16),
    )


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [m, k] in blocks of BLOCK inputs (the last padded with zeros), each block
    scaled to +-127 by its largest magnitude, rounded to nearest even. Returns (q [m, blocks,
    BLOCK] as fp32 integers, scale [m, blocks] fp32), as csrc/linear_i8.c computes them."""
    k = x.shape[-1]
    blocks = F.pad(x.float(), (0, _padded(k) - k)).reshape(len(x), _padded(k) // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    # a division, as the kernel does (`127 / amax` would be torch's reciprocal times 127),
    # capped where a tiny amax would give inf (and 0 x inf, NaN)
    inv = torch.full_like(amax, 127).div(amax).clamp(max=torch.finfo(torch.float32).max)
    return torch.round(blocks * torch.where(amax > 0, inv, 0)[..., None]), amax / 127


def reference_int8(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What `linear` computes for an int8 weight (q and its fp16 block scales, quantize_int8),
    summed in another order: x's blocks quantized (quantize_activations), each block's integer
    dot product with q's (exact in fp32: 32 products of at most 127 x 127), times both blocks'
    scales, summed over blocks, plus the bias, rounded to x's dtype once. Also the model's path
    where the kernel does not serve."""
    rows = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_activations(rows)
    k = q.shape[1]
    wq = F.pad(q.float(), (0, _padded(k) - k)).reshape(len(q), -1, BLOCK)
    ws = scale.float()
    y = torch.zeros(len(rows), len(q))
    for b in range(wq.shape[1]):
        y += (xq[:, b] @ wq[:, b].T) * (ws[:, b] * xs[:, b, None])
    return (y if bias is None else y + bias.float()).to(x.dtype).reshape(*x.shape[:-1], len(q))


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An int8 weight [out, in] and its block scales (quantize_int8) packed for `linear`, or
    None where the kernel does not serve (no C library, no AVX-512 VNNI and BF16). The scales
    go [out / 16][blocks][16]: a block's 16 columns side by side, as the kernel loads them."""
    packed = _pack(q, torch.int8, "linear_i8_pack")
    if packed is None:
        return None
    out_features, blocks = scale.shape
    rows = -(-out_features // COLS) * COLS
    scales = F.pad(scale, (0, 0, 0, rows - out_features)).reshape(-1, COLS, blocks)
    return packed, scales.transpose(1, 2).contiguous()


def linear(
    x: torch.Tensor,  # [..., in] bf16
    packed: torch.Tensor,  # from pack(weight), or pack_int8's first
    bias: torch.Tensor | None,  # [out]
    out_features: int,
    scale: torch.Tensor | None = None,  # pack_int8's second: the weight is int8
) -> torch.Tensor:
    """x @ weight.T + bias, [..., out]: fp32 sums (of int8 blocks times their scales), rounded
    to bf16 once."""
    lib = native.load()
    assert lib is not None, "pack() returns None where the library did not build"
    assert x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
    in_features = x.shape[-1]
    stored = in_features if scale is None else _padded(in_features)
    assert packed.numel() == -(-out_features // COLS) * COLS * stored, "not this weight's shape"
    rows = x.reshape(-1, in_features).contiguous()
    out = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    bias = None if bias is None else bias.contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    shape = (rows.data_ptr(), rows.shape[0], in_features, packed.data_ptr())
    if scale is None:
        status = lib.linear_bf16(*shape, out_features, bias_ptr, out.data_ptr())
    else:
        assert scale.dtype == torch.float16 and scale.is_contiguous()
        assert scale.dim() == 3 and scale.numel() * BLOCK == packed.numel(), "not packed scales"
        status = lib.linear_i8(*shape, scale.data_ptr(), out_features, bias_ptr, out.data_ptr())
    assert status == 0, "the kernel refused a weight its pack took"
    return out
