"""Everything a model-running process needs, built once from an EngineConfig: weights, the
paged KV pool and its manager, the sampler and the runner."""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from baton import protocol as P
from baton.cache.kv_cache import KVCache, block_nbytes
from baton.cache.kv_manager import KVCacheManager
from baton.cache.ram_tier import RamTier
from baton.cache.tier import DiskTier, Tier
from baton.config import EngineConfig
from baton.model.files import resolve_model_dir
from baton.model.llama import CausalLM
from baton.model.loader import eos_token_ids, load_model, load_tokenizer
from baton.runner import ModelRunner
from baton.sampler import Sampler
from baton.scheduler import Scheduler
from baton.structured import Grammars

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Engine:
    config: EngineConfig
    model: CausalLM
    tokenizer: Any  # a transformers tokenizer, or None for a weights-only model
    eos_token_ids: frozenset[int]
    max_model_len: int
    kv: KVCache
    kv_manager: KVCacheManager
    runner: ModelRunner

    @classmethod
    def build(
        cls, config: EngineConfig, kv_storage: Callable[[int], torch.Tensor] | None = None
    ) -> "Engine":
        """kv_storage(nbytes): zeroed uint8 memory for the KV pool (e.g. a shared-memory
        segment that KV peers read); unset: private memory."""
        if config.threads:
            torch.set_num_threads(config.threads)
        model_dir = resolve_model_dir(config.model)
        dtype = DTYPES[config.dtype]
        kv_dtype = torch.int8 if config.kv_dtype == "int8" else dtype
        model = load_model(model_dir, dtype, config.quantization)
        tokenizer = load_tokenizer(model_dir)
        eos = eos_token_ids(model_dir, tokenizer)
        args = model.args
        max_model_len = min(config.max_model_len or args.max_position, args.max_position)
        per_block = block_nbytes(args, config.block_size, kv_dtype)
        num_blocks = config.num_blocks or max(1, int(config.kv_cache_gib * 2**30) // per_block)
        storage = kv_storage and kv_storage(num_blocks * per_block)
        kv = KVCache(args, num_blocks, config.block_size, kv_dtype, storage)
        log.info(
            "model %s (%s, weights %s, KV %s), %d KV blocks of %d tokens (%.2f GiB)",
            model_dir,
            config.dtype,
            config.quantization or config.dtype,
            config.kv_dtype,
            num_blocks,
            config.block_size,
            num_blocks * kv.block_nbytes / 2**30,
        )
        tier: Tier | None = None  # the chain below the pool: RAM, then disk, either, or none
        if config.kv_tier_dir:
            cap = int(config.kv_tier_gib * 2**30)
            tier = DiskTier(config.kv_tier_dir, cap, fingerprint(model, kv), kv.bytes.numpy())
        if config.kv_tier_ram_gib:
            tier = RamTier(int(config.kv_tier_ram_gib * 2**30), kv.bytes.numpy(), below=tier)
        return cls(
            config=config,
            model=model,
            tokenizer=tokenizer,
            eos_token_ids=eos,
            max_model_len=max_model_len,
            kv=kv,
            kv_manager=KVCacheManager(
                num_blocks, config.block_size, config.enable_prefix_caching, tier
            ),
            runner=ModelRunner(model, kv, Sampler(eos, Grammars(tokenizer, args.vocab_size, eos))),
        )

    def scheduler(self, hands_off: bool = False) -> Scheduler:
        """hands_off: a prefill's, whose prompts' blocks all go to a decode (the blocks behind
        a sliding window are then not given back early: the offers name them)."""
        c, args = self.config, self.model.args
        every_layer_slides = len(args.sliding_layers) == args.num_layers
        return Scheduler(
            self.kv_manager,
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_chunk_tokens=c.max_chunk_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            vocab_size=args.vocab_size,
            window=args.sliding_window if every_layer_slides and not hands_off else None,
        )

    def close(self) -> None:
        """Let the KV tier finish its queued writes."""
        if self.kv_manager.tier is not None:
            self.kv_manager.tier.close()

    def layout(self) -> P.KVLayout:
        """What a KV peer must match: block bytes mean the same thing at both ends."""
        a = self.model.args
        return P.KVLayout(
            model=hashlib.blake2b(repr(a).encode(), digest_size=8).hexdigest(),
            dtype=str(self.kv.dtype).removeprefix("torch."),  # the cache's: int8 or the model's
            block_size=self.config.block_size,
            num_layers=a.num_layers,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            block_nbytes=self.kv.block_nbytes,
        )


def fingerprint(model: CausalLM, kv: KVCache) -> bytes:
    """Which weights and which block layout KV bytes belong to (the KV tier's files carry it):
    the model's shape, the cache's dtype and block size, and a sample of every weight tensor
    (two random-weight models of one config differ there)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((model.args, kv.dtype, kv.block_size, kv.block_nbytes)).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().flatten()[:64].float().numpy().tobytes())
    return h.digest()
