"""Ops over the paged KV cache. Each module holds the torch reference (the CPU path and the
oracle for tests); Triton versions sit beside them when they exist."""

from kernels.kv_write import write_kv
from kernels.paged_attention import extend_attention, paged_decode_attention

__all__ = ["extend_attention", "paged_decode_attention", "write_kv"]
