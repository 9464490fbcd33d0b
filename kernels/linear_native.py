"""bf16 linear layer in C for a CPU with AVX-512 BF16 (kernels/csrc/linear.c), its weight in
bf16 (`F.linear` is the reference; on an AMX CPU oneDNN serves instead) or in int8 with a scale
per output column (`reference_int8`; `quantize_int8` makes the pair). The weight is packed once
(`pack`, `pack_int8`), then every call multiplies against the packed copy; each output row is
summed in the same order whatever the batch."""

import torch

from baton.kernels import native

COLS = 16  # the packed weight's columns come in runs of this many (csrc/linear.c)


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
    packed = torch.empty(-(-out_features // COLS) * COLS * in_features, dtype=dtype)
    if getattr(lib, c_pack)(weight.data_ptr(), out_features, in_features, packed.data_ptr()):
        return None
    return packed


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8: each output row scaled to +-127 by its largest magnitude (symmetric,
    per output channel), rounded to nearest. Returns (q [out, in] int8, scale [out] fp32)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def reference_int8(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ (q * scale).T + bias in fp32, rounded to x's dtype once: what `linear_int8`
    computes, in another summing order; also the model's path where the kernel does not serve."""
    y = torch.nn.functional.linear(x.float(), q.float()) * scale
    return (y if bias is None else y + bias.float()).to(x.dtype)


def pack_int8(q: torch.Tensor) -> torch.Tensor | None:
    """An int8 weight [out, in] packed for `linear_int8`, or None where the kernel does not
    serve (no C library, no AVX-512 BF16, an odd `in`)."""
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
    in_features = packed.numel() // (-(-out_features // COLS) * COLS)
    assert x.shape[-1] == in_features, f"input has {x.shape[-1]} features, not {in_features}"
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
