"""The projections' layer: nn.Linear with its weight packed once for the CPU kernels (bf16, or
int8 with `--quantization int8`), and several projections of one input fused into one."""

import torch
from torch import nn

from baton import kernels
from baton.kernels import linear_native


def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear(nn.Linear):
    """nn.Linear whose weight `prepack` can pack once for a faster bf16 matmul on a CPU: the C
    kernel (kernels/linear_native.py) where this CPU has AVX-512 BF16 without AMX, else oneDNN's
    own layout where it has bf16 support (bit-identical to torch's). Either is 1.2-4x faster
    than `F.linear` at decode batch sizes (RESULTS.md). fp32 is left to torch: another summing
    order would break the tests' exact comparison of fp32 tokens with transformers."""

    packed: torch.Tensor | None = None
    native: bool = False  # packed for kernels/linear_native.py, not for oneDNN
    scale: torch.Tensor | None = None  # int8 weight (quantize): its fp16 block scales
    qweight: torch.Tensor | None = None  # int8 weight, where the C kernel does not serve

    def quantize(self, blocks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """int8 weights (`--quantization int8`): the weight as int8 in blocks of 32 with fp16
        scales (llama.cpp's Q8_0, kernels/linear_native.quantize_int8), given as `blocks`
        (the loader quantizes the checkpoint's tensors before their cast to dtype) or made
        from the weight; packed for the C kernel where it serves (bf16 activations on AVX-512
        VNNI and BF16, quantized in blocks of 32 per call), else kept for the torch reference,
        which computes the same. The float weight is dropped; a tied lm_head's stays with the
        embedding, which reads it."""
        q, scale = blocks if blocks is not None else linear_native.quantize_int8(self.weight)
        packed = None
        if kernels.BACKEND == "native" and self.weight.dtype == torch.bfloat16:
            packed = linear_native.pack_int8(q, scale)
        self.native = packed is not None
        self.packed, self.scale = packed if packed is not None else (None, scale)
        self.qweight = None if self.native else q
        self.register_parameter("weight", None)
        # in the state dict, so the KV tier's fingerprint (Engine) samples the int8 weights
        self.register_buffer("int8_weight", self.packed if self.native else q)
        self.register_buffer("int8_scale", self.scale)

    def prepack(self) -> None:
        if kernels.BACKEND == "native":
            self.packed = linear_native.pack(self.weight)
            self.native = self.packed is not None
        if self.packed is None and _onednn_bf16():
            # 32 rows is the batch oneDNN tunes the layout for; any row count runs
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return linear_native.linear(x, self.packed, self.bias, self.out_features, self.scale)
        if self.qweight is not None:
            return linear_native.reference_int8(x, self.qweight, self.scale, self.bias)
        if self.packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def linear_of(weight: torch.Tensor) -> Linear:
    """A bias-free Linear over `weight` [out, in] (a view, not a copy)."""
    with torch.device("meta"):
        m = Linear(weight.shape[1], weight.shape[0], bias=False)
    m.weight = nn.Parameter(weight, requires_grad=False)
    return m


class FusedLinear(Linear):
    """Several projections of the same input as one matmul; `sizes` are their output widths."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool):
        super().__init__(in_features, sum(sizes), bias=bias)
        self.sizes = sizes
