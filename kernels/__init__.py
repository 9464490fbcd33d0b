"""Ops over the paged KV cache, the model's norms and rotary, and greedy sampling's argmax,
bound once to one backend.

Each op has a torch reference (`kernels/<op>.py`: the CPU path and the oracle for tests) and a
Triton twin beside it (`kernels/<op>_triton.py`; the argmax keeps torch's, fast on a GPU).
Callers use the names below, e.g. `kernels.write_kv(...)`, looked up on this module at call
time, so `use()` rebinds every caller at once and model code never checks a device.

Importing this module binds the torch ops and builds nothing; `use()` binds a backend, called
when a model's weights load (baton.model.loader.load_model, from $BATON_KERNELS): `auto` (the default: Triton for a CUDA engine,
`native` for a CPU one; the engine runs on CPU today), `triton`, `native` (the torch ops with
the KV scatter, decode attention, bf16 extend attention, add + RMSNorm, rotary, the argmax
and the token bitmask in C, kernels/native.py; torch alone where no C compiler works; the model's bf16 projections
use its C linear layer too) or `torch`.
Triton on a CPU needs TRITON_INTERPRET=1 set before `import triton` (its numpy interpreter:
for tests, far too slow to serve).
"""

import os
from collections.abc import Callable

import torch

from baton.kernels import native
from baton.kernels.greedy import apply_token_bitmask, argmax
from baton.kernels.kv_int8 import (
    extend_attention_varlen_int8,
    paged_decode_attention_int8,
    write_kv_int8,
)
from baton.kernels.kv_write import write_kv
from baton.kernels.norm import add_rms_norm
from baton.kernels.paged_attention import extend_attention_varlen, paged_decode_attention
from baton.kernels.rotary import apply_rotary

_TORCH_OPS: dict[str, Callable] = {
    "argmax": argmax,
    "apply_token_bitmask": apply_token_bitmask,
    "write_kv": write_kv,
    "add_rms_norm": add_rms_norm,
    "apply_rotary": apply_rotary,
    "extend_attention_varlen": extend_attention_varlen,
    "paged_decode_attention": paged_decode_attention,
    # the 8-bit cache: dequantize into scratch, then the ops above (kv_int8.py)
    "write_kv_int8": write_kv_int8,
    "extend_attention_varlen_int8": extend_attention_varlen_int8,
    "paged_decode_attention_int8": paged_decode_attention_int8,
}
BACKEND = "torch"  # the names imported above; use() rebinds both
_chosen = False  # use() was called: bind_default() leaves the choice alone


def _triton_ops() -> dict[str, Callable]:
    import triton  # only here: the torch backend must not need it installed

    if not (torch.cuda.is_available() or triton.knobs.runtime.interpret):
        raise RuntimeError("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on a CPU")
    from baton.kernels import kv_write_triton, norm_triton, paged_attention_triton, rotary_triton

    return {
        **_TORCH_OPS,
        "argmax": argmax,  # torch's own is fast on a GPU
        "write_kv": kv_write_triton.write_kv,
        "add_rms_norm": norm_triton.add_rms_norm,
        "apply_rotary": rotary_triton.apply_rotary,
        "extend_attention_varlen": paged_attention_triton.extend_attention_varlen,
        "paged_decode_attention": paged_attention_triton.paged_decode_attention,
    }


def _native_ops() -> dict[str, Callable]:
    from baton.kernels import (
        greedy_native,
        kv_write_native,
        norm_native,
        paged_attention_native,
        rotary_native,
    )

    return {
        **_TORCH_OPS,
        "argmax": greedy_native.argmax,
        "apply_token_bitmask": greedy_native.apply_token_bitmask,
        "write_kv": kv_write_native.write_kv,
        "write_kv_int8": kv_write_native.write_kv_int8,
        "add_rms_norm": norm_native.add_rms_norm,
        "apply_rotary": rotary_native.apply_rotary,
        "paged_decode_attention": paged_attention_native.paged_decode_attention,
        "paged_decode_attention_int8": paged_attention_native.paged_decode_attention_int8,
        "extend_attention_varlen": paged_attention_native.extend_attention_varlen,
    }


def use(backend: str, device: str = "cpu") -> None:
    """Bind every op to `backend`: "triton", "native", "torch", or "auto" (Triton on a CUDA
    device, else native)."""
    global BACKEND, _chosen
    if backend == "auto":
        backend = "triton" if device.startswith("cuda") else "native"
    if backend == "native" and native.load() is None:
        backend = "torch"  # no C compiler here (logged): the torch ops serve alone
    ops = {"triton": _triton_ops, "native": _native_ops, "torch": lambda: _TORCH_OPS}
    if backend not in ops:
        raise ValueError(f"BATON_KERNELS must be auto, triton, native or torch, not {backend!r}")
    globals().update(ops[backend]())
    BACKEND, _chosen = backend, True


def bind_default(device: str = "cpu") -> None:
    """Bind $BATON_KERNELS (default auto) unless a backend was chosen already."""
    if not _chosen:
        use(os.environ.get("BATON_KERNELS", "auto"), device)


__all__ = ["BACKEND", "bind_default", "use", *_TORCH_OPS]
