"""Rotary position embedding (rotate-half, as Llama, Mistral and Qwen2 use), torch reference
(Triton: rotary_triton.py)."""

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rotary(
    q: torch.Tensor,  # [T, q_heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    positions: torch.Tensor,  # [T]
    cos: torch.Tensor,  # [max_position, head_dim]: both halves hold the same frequencies
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns q and k rotated by the angle of each token's position."""
    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
