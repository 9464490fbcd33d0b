"""bf16 linear layer in C for a CPU with AVX-512 BF16 and no AMX (kernels/csrc/linear.c);
`F.linear` is the reference. The weight is packed once (`pack`), then every call multiplies
against the packed copy; each output row is summed in the same order whatever the batch."""

import torch

from baton.kernels import native

COLS = 16  # the packed weight's columns come in runs of this many (csrc/linear.c)


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] packed for `linear`, or None where the kernel does not serve: no C
    library, no AVX-512 BF16 (or AMX, where oneDNN is faster), not bf16, an odd `in`."""
    lib = native.load()
    if lib is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return None
    weight = weight.contiguous()
    out_features, in_features = weight.shape
    padded = -(-out_features // COLS) * COLS
    packed = torch.empty(padded * in_features, dtype=torch.bfloat16)
    if lib.linear_bf16_pack(weight.data_ptr(), out_features, in_features, packed.data_ptr()):
        return None
    return packed


def linear(
    x: torch.Tensor,  # [..., in] bf16
    packed: torch.Tensor,  # from pack(weight)
    bias: torch.Tensor | None,  # [out]
    out_features: int,
) -> torch.Tensor:
    """x @ weight.T + bias, [..., out]: fp32 sums, rounded to bf16 once."""
    lib = native.load()
    assert lib is not None, "pack() returns None where the library did not build"
    assert x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
    in_features = packed.numel() // (-(-out_features // COLS) * COLS)
    assert x.shape[-1] == in_features, f"input has {x.shape[-1]} features, not {in_features}"
    rows = x.reshape(-1, in_features).contiguous()
    out = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    bias = None if bias is None else bias.contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    status = lib.linear_bf16(
        rows.data_ptr(), rows.shape[0], in_features, packed.data_ptr(), out_features, bias_ptr,
        out.data_ptr(),
    )  # fmt: skip
    assert status == 0, "linear_bf16 refused a weight that linear_bf16_pack took"
    return out
