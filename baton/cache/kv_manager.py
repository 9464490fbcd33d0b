"""Per-sequence KV block tables over the block pool, with prefix caching (plain Python).

A full block's hash chains over its parent's hash and its token ids, so equal hashes mean equal
prefixes; the first block's parent is the request's cache salt (SamplingParams.cache_salt), so
only requests of one salt share blocks. A prefix hit never covers the whole prompt: the last prompt token is always computed,
because its logits give the first output token. Below the pool, an optional KV tier
(baton.cache.tier) keeps what the pool evicts; `tier_prefix` says how much further it reaches.
What the two hold between them is published as it changes (`events`, for the gateway's index).
"""

import hashlib
import queue
from array import array
from typing import TYPE_CHECKING

from baton import protocol as P
from baton.cache.block_pool import BlockPool, OutOfBlocks
from baton.cache.events import CacheEvents
from baton.request import Sequence

if TYPE_CHECKING:
    from baton.cache.tier import Tier


def blocks_behind(first_position: int, window: int, block_size: int) -> int:
    """Leading blocks a sliding layer of `window` positions no longer reads once its queries
    start at `first_position`: the earliest it sees is first_position - window + 1."""
    return max(0, first_position - window + 1) // block_size


def chain_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        tier: "Tier | None" = None,
    ):
        self.tier = tier if enable_prefix_caching else None
        self.events = CacheEvents(self.held_hashes) if enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, on_evict=self._evicted if self.events else None)
        if self.tier is not None:
            self.tier.on_stored = self.events.stored
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

    def held_hashes(self) -> list[bytes]:
        """Every full block a prefix can hit here: cached in the pool, or in the tier."""
        held = self.pool.cached_hashes()
        if self.tier is not None:
            held += [h for h in self.tier.hashes() if self.pool.lookup(h) is None]
        return held

    def _evicted(self, block: int, block_hash: bytes) -> None:
        """The pool reuses a cached block: the tier copies it out first (if it can)."""
        if self.tier is not None:
            self.tier.save(block, block_hash, durable=False)
            if self.tier.indexed(block_hash):
                return
        self.events.removed(block_hash)

    def cache_events(self) -> P.CacheEvents | None:
        """The next batch of what the pool and the tier gained and lost (baton.cache.events).
        A file the tier dropped (its worker trims) is judged here, on the engine thread: it
        is gone only where the pool does not cache the block and the tier has not taken it
        again since."""
        if self.events is None:
            return None
        if self.tier is not None:
            if self.tier.dropped is None:  # from the first batch, a snapshot, on
                self.tier.dropped = queue.SimpleQueue()
            while not self.tier.dropped.empty():
                block_hash = self.tier.dropped.get_nowait()
                if self.pool.lookup(block_hash) is None and not self.tier.indexed(block_hash):
                    self.events.removed(block_hash)
        return self.events.take()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), upto_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.params.cache_salt
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks yet the cached blocks of its longest cached prefix."""
        assert not seq.block_ids and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        self._update_hashes(seq, seq.num_tokens - 1)
        for h in seq.block_hashes:
            block = self.pool.lookup(h)
            if block is None:
                break
            self.pool.share(block)
            seq.block_ids.append(block)
        seq.num_cached_blocks = len(seq.block_ids)
        seq.num_computed_tokens = seq.num_cached_blocks * self.block_size

    def tier_prefix(self, seq: Sequence) -> list[bytes]:
        """After `match_prefix`: the hashes of the prompt's next blocks that the tier holds."""
        if self.tier is None:
            return []
        out = []
        for h in seq.block_hashes[len(seq.block_ids) :]:
            if not self.tier.holds(h):
                break
            out.append(h)
        return out

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        return need <= self.pool.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make the block table cover `num_new_tokens` more tokens; raises OutOfBlocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need > 0:
            seq.block_ids.extend(self.pool.allocate(need))

    def cache_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly computed full blocks for prefix hits."""
        if not self.enable_prefix_caching or seq.kv_in_part:
            return
        full = seq.num_computed_tokens // self.block_size
        self._update_hashes(seq, full * self.block_size)
        for i in range(seq.num_cached_blocks, full):
            if self.pool.register(seq.block_ids[i], seq.block_hashes[i]):
                self.events.stored(seq.block_hashes[i])
            if self.tier is not None and seq.params.session_ttl_s:  # written through
                self.tier.save(seq.block_ids[i], seq.block_hashes[i], durable=True)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def free_behind(self, seq: Sequence, window: int) -> None:
        """Give back the leading blocks no query of a model whose every layer slides over
        `window` positions reads again (the next is at num_computed_tokens). Published ones stay
        cached for prefix hits, as any released block."""
        behind = blocks_behind(seq.num_computed_tokens, window, self.block_size)
        if behind > seq.num_freed_blocks:
            freed = seq.block_ids[seq.num_freed_blocks : behind][::-1]
            self.pool.release(freed, self._keep_until(seq))
            seq.num_freed_blocks = behind

    def _keep_until(self, seq: Sequence) -> float | None:
        """A live session's blocks stay cached longest (SamplingParams.session_ttl_s)."""
        ttl = seq.params.session_ttl_s
        return self.pool.clock() + ttl if ttl else None

    def free(self, seq: Sequence) -> None:
        """Release its blocks (_keep_until)."""
        self.pool.release(seq.block_ids[seq.num_freed_blocks :][::-1], self._keep_until(seq))
        seq.block_ids = []
        seq.num_cached_blocks = seq.num_freed_blocks = 0
        seq.kv_in_part = False  # computed again (preempted), its blocks are whole


__all__ = ["KVCacheManager", "OutOfBlocks", "chain_hash"]
