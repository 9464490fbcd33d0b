"""Engine configuration: a msgspec Struct, so it loads from TOML with typed errors."""

from typing import Literal

import msgspec


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None  # HF directory or GGUF file; None: SmolLM2-135M-Instruct
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV pool size in blocks; overrides kv_cache_gib
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 512  # token budget per step
    max_chunk_tokens: int | None = None  # per-sequence chunk cap (None: the budget)
    max_model_len: int | None = None  # None: the model's own limit
    enable_prefix_caching: bool = True
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        positive = ["block_size", "max_num_seqs", "max_num_batched_tokens"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
