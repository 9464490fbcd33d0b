"""The block pool: who holds which KV block (plain Python, no torch).

Every block is in exactly one of three states:
- free: holds nothing reusable; in `_free`, handed out first, in FIFO order;
- cached: ref count 0 but holds a full block whose hash is known; in `_evictable`, an LRU
  (least recently released first), reusable by a prefix hit or evicted when `_free` runs dry;
- held: ref count > 0 (by sequences, or by a lease for a peer).
"""

from collections import OrderedDict, deque


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out (free + cached-but-unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self.block_hashes[block]]
                self.block_hashes[block] = None
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def share(self, block: int) -> None:
        """Take one more reference to a block (a prefix hit, or a lease)."""
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Pass a sequence's blocks tail first: its last blocks
        are the least likely to be shared, so they are evicted first."""
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} released more often than taken")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that a held block now holds the full block with this chained hash."""
        if self.block_hashes[block] is not None or block_hash in self._by_hash:
            return  # already cached (here, or the same content in another block)
        self.block_hashes[block] = block_hash
        self._by_hash[block_hash] = block

    def check_invariants(self) -> None:
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        for b in range(self.num_blocks):
            held = self.ref_counts[b] > 0
            assert held + (b in free) + (b in evictable) == 1, f"block {b} in two states"
            assert (b in free) <= (self.block_hashes[b] is None)
            assert (b in evictable) <= (self.block_hashes[b] is not None)
        assert all(self.block_hashes[b] == h for h, b in self._by_hash.items())
