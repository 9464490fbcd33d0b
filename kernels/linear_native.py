"""The linear layer in C for a CPU with AVX-512 BF16, its weight in bf16 (kernels/csrc/linear.c;
`F.linear` is the reference; on an AMX CPU oneDNN serves instead) or in int8 with a scale per
output column (csrc/linear_i8.c, on AVX-512 VNNI; `quantize_int8` makes the pair), the
activations then quantized to int8 in blocks of 32 as each call begins (`reference_int8`). The
weight is packed once (`pack`, `pack_int8`), then every call multiplies against the packed
copy; each output row is summed in the same order whatever the batch."""

import torch
import torch.nn.functional as F

from baton.kernels import native

COLS = 16  # the packed weight's columns come in runs of this many (csrc/linear.c)
BLOCK = 32  # int8 activations share a scale over this many inputs (csrc/linear_i8.c)


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
    """Weight-only int8: each output row scaled to +-127 by its largest magnitude (symmetric,
    per output channel), rounded to nearest. Returns (q [out, in] int8, scale [out] fp32)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


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
    """What `linear` computes for an int8 weight, summed in another order: x's blocks quantized
    (quantize_activations), each block's integer dot product with q's (exact in fp32: 32
    products of at most 127 x 127), times the block's scale, summed over blocks; times the
    column's scale, plus the bias, rounded to x's dtype once. Also the model's path where the
    kernel does not serve."""
    rows = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_activations(rows)
    k = q.shape[1]
    wq = F.pad(q.float(), (0, _padded(k) - k)).reshape(len(q), -1, BLOCK)
    y = torch.zeros(len(rows), len(q))
    for b in range(wq.shape[1]):
        y += xs[:, b, None] * (xq[:, b] @ wq[:, b].T)
    y = y * scale
    return (y if bias is None else y + bias.float()).to(x.dtype).reshape(*x.shape[:-1], len(q))


def pack_int8(q: torch.Tensor) -> torch.Tensor | None:
    """An int8 weight [out, in] packed for `linear` (with its scale), or None where the kernel
    does not serve (no C library, no AVX-512 VNNI and BF16)."""
    return _pack(q, torch.int8, "linear_i8_pack")


def linear(
    x: torch.Tensor,  # [..., in] bf16
    packed: torch.Tensor,  # from pack(weight) or pack_int8(q)
    bias: torch.Tensor | None,  # [out]
    out_features: int,
    scale: torch.Tensor | None = None,  # [out] fp32: the weight is int8 (quantize_int8)
) -> torch.Tensor:
    """x @ weight.T + bias, [..., out]: fp32 sums (times the column's scale), rounded to
    bf16 once."""
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
        assert scale.dtype == torch.float32 and scale.is_contiguous()
        status = lib.linear_i8(*shape, scale.data_ptr(), out_features, bias_ptr, out.data_ptr())
    assert status == 0, "the kernel refused a weight its pack took"
    return out
