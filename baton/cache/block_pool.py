"""The block pool: who holds which KV block (plain Python, no torch).

Every block is in exactly one of three states:
- free: holds nothing reusable; in `_free`, handed out first, in FIFO order;
- cached: ref count 0 but holds a full block whose hash is known, reusable by a prefix hit or
  evicted when `_free` runs dry: in `_evictable`, an LRU (least recently released first), or,
  released by a live agent session (`release(..., keep_until=...)`), in `_retained`, which is
  evicted only once `_evictable` is empty, and whose blocks become ordinary cached blocks again
  once their time has passed;
- held: ref count > 0 (by sequences, or by a lease for a peer).

`on_evict(block, hash)` runs as a cached block is evicted, before its bytes are reused: the KV
tier (baton.cache.tier) copies them out there.
"""

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        on_evict: Callable[[int, bytes], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._retained: OrderedDict[int, float] = OrderedDict()  # block -> kept until (clock)
        self._next_expiry = math.inf  # no retained block expires before this
        self._by_hash: dict[bytes, int] = {}
        self.on_evict, self.clock = on_evict, clock

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out (free + cached-but-unreferenced)."""
        return len(self._free) + len(self._evictable) + len(self._retained)

    @property
    def num_retained(self) -> int:
        return len(self._retained)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            block = self._free.popleft() if self._free else self._evict()
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def _evict(self) -> int:
        """The cached block to reuse: the least recently released ordinary one (an expired
        retained one is ordinary again), else the least recently released retained one."""
        self._expire()
        if self._evictable:
            block, _ = self._evictable.popitem(last=False)
        else:
            block, _ = self._retained.popitem(last=False)
        block_hash = self.block_hashes[block]
        if self.on_evict is not None:
            self.on_evict(block, block_hash)
        del self._by_hash[block_hash]
        self.block_hashes[block] = None
        return block

    def _expire(self) -> None:
        """Retained blocks whose time has passed join the ordinary LRU, as its oldest."""
        now = self.clock()
        if now < self._next_expiry:  # a scan per eviction would be quadratic
            return
        for block in [b for b, until in self._retained.items() if until <= now]:
            del self._retained[block]
            self._evictable[block] = None
            self._evictable.move_to_end(block, last=False)
        self._next_expiry = min(self._retained.values(), default=math.inf)

    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def share(self, block: int) -> None:
        """Take one more reference to a block (a prefix hit, or a lease)."""
        if self.ref_counts[block] == 0:
            self._evictable.pop(block, None)
            self._retained.pop(block, None)
        self.ref_counts[block] += 1

    def release(self, blocks: list[int], keep_until: float | None = None) -> None:
        """Drop one reference to each block. Pass a sequence's blocks tail first: its last blocks
        are the least likely to be shared, so they are evicted first. `keep_until` (clock
        time): cached blocks are retained until then (a live session's)."""
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} released more often than taken")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is None:
                    self._free.append(block)
                elif keep_until is not None and keep_until > self.clock():
                    self._retained[block] = keep_until
                    self._next_expiry = min(self._next_expiry, keep_until)
                else:
                    self._evictable[block] = None

    def register(self, block: int, block_hash: bytes) -> bool:
        """Record that a held block now holds the full block with this chained hash; False
        where it was cached already (here, or the same content in another block)."""
        if self.block_hashes[block] is not None or block_hash in self._by_hash:
            return False
        self.block_hashes[block] = block_hash
        self._by_hash[block_hash] = block
        return True

    def cached_hashes(self) -> list[bytes]:
        return list(self._by_hash)

    def check_invariants(self) -> None:
        free, evictable = set(self._free), set(self._evictable) | set(self._retained)
        assert len(free) == len(self._free) and not free & evictable
        assert not set(self._evictable) & set(self._retained)
        for b in range(self.num_blocks):
            held = self.ref_counts[b] > 0
            assert held + (b in free) + (b in evictable) == 1, f"block {b} in two states"
            assert (b in free) <= (self.block_hashes[b] is None)
            assert (b in evictable) <= (self.block_hashes[b] is not None)
        assert all(self.block_hashes[b] == h for h, b in self._by_hash.items())
