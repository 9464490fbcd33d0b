"""Host RAM as a KV tier, alone or above the disk tier (baton.cache.tier: the chain)."""

import queue
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from baton.cache.tier import Level, Tier, TierStats


class RamTier:
    """Host memory above another tier (or alone): a block the pool evicts is copied here (one
    the tier below holds too: read back from there, it was just used; or a session's, written
    through), the least recently used spill to the tier below (which writes them behind), and a
    prefix found here is copied back at once, the rest read from below. A session's blocks
    written through go to the tier below, which outlives the process. On the engine thread
    only. Where the pool is on a GPU this is the host-RAM tier; on a CPU, where the pool is
    RAM, it adds room."""

    def __init__(self, cap_bytes: int, blocks: np.ndarray, below: Tier | None = None):
        self.blocks, self.below = blocks, below
        self.cap_blocks = max(1, cap_bytes // blocks.shape[1])
        self._store: OrderedDict[bytes, bytes] = OrderedDict()  # least recently used first
        self._own = TierStats()
        self._done: list[tuple[Any, int]] = []
        # a load waiting on the tier below: key -> (positions below reads, the prefix's length,
        # positions copied from here)
        self._from_below: dict[Any, tuple[list[int], int, list[int]]] = {}
        self._on_stored: Callable[[bytes], None] | None = None
        self._dropped: queue.SimpleQueue[bytes] | None = None

    # a chain reports as one: what the tier below gains and loses is the chain's
    @property
    def on_stored(self) -> Callable[[bytes], None] | None:
        return self._on_stored

    @on_stored.setter
    def on_stored(self, fn: Callable[[bytes], None] | None) -> None:
        self._on_stored = fn
        if self.below is not None:
            self.below.on_stored = fn

    @property
    def dropped(self) -> "queue.SimpleQueue[bytes] | None":
        return self._dropped

    @dropped.setter
    def dropped(self, q: "queue.SimpleQueue[bytes] | None") -> None:
        self._dropped = q
        if self.below is not None:
            self.below.dropped = q

    @property
    def stats(self) -> TierStats:
        return self._own + self.below.stats if self.below is not None else self._own

    @property
    def cap_files(self) -> int:
        return self.cap_blocks + (self.below.cap_files if self.below is not None else 0)

    @property
    def num_blocks(self) -> int:  # a block held here and below counts once
        return len(self.hashes())

    @property
    def size_bytes(self) -> int:
        return sum(level.size_bytes for level in self.levels)

    @property
    def levels(self) -> list[Level]:
        own = Level("ram", self._own, len(self._store) * self.blocks.shape[1])
        return [own, *(self.below.levels if self.below is not None else [])]

    def indexed(self, block_hash: bytes) -> bool:
        return block_hash in self._store or bool(self.below and self.below.indexed(block_hash))

    def holds(self, block_hash: bytes) -> bool:
        return block_hash in self._store or bool(self.below and self.below.holds(block_hash))

    def hashes(self) -> list[bytes]:
        below = self.below.hashes() if self.below is not None else []
        return [*self._store, *(h for h in below if h not in self._store)]

    def save(self, block: int, block_hash: bytes, durable: bool = False) -> None:
        """durable: a session's block, still in the pool, written through to the tier below
        (RAM alone cannot keep it past the process: it takes it when the pool evicts it)."""
        if durable:
            if self.below is not None:
                self.below.save(block, block_hash, durable=True)
        elif block_hash in self._store:
            self._store.move_to_end(block_hash)
        else:  # the disk may hold it too: a block read back from there is hot, RAM takes it
            self.put(block_hash, self.blocks[block].tobytes())

    def put(self, block_hash: bytes, data: bytes) -> None:
        self._store[block_hash] = data
        self._own.written_bytes += len(data)
        if self._on_stored is not None:
            self._on_stored(block_hash)
        while len(self._store) > self.cap_blocks:
            old, old_data = self._store.popitem(last=False)
            if self.below is not None:
                self.below.put(old, old_data)  # (it counts what it has no room for)
            else:
                self._own.dropped_writes += 1
            if not (self.below and self.below.indexed(old)) and self._dropped is not None:
                self._dropped.put(old)  # gone from the chain

    def load(self, key: Any, pairs: list[tuple[int, bytes]]) -> None:
        """Blocks held here are copied now; those below are read there (`landed` counts the
        prefix read, to the first block neither gives)."""
        ram: list[int] = []  # positions in `pairs` copied from here
        below: list[int] = []  # positions in `pairs` the tier below is to read
        for i, (block, block_hash) in enumerate(pairs):
            if (data := self._store.get(block_hash)) is not None:
                self.blocks[block] = np.frombuffer(data, np.uint8)
                self._store.move_to_end(block_hash)
                ram.append(i)
            elif self.below is not None and self.below.holds(block_hash):
                below.append(i)
            else:
                pairs = pairs[:i]
                break
        if not below:
            self._landed(key, len(pairs), ram)
            return
        self._from_below[key] = (below, len(pairs), ram)
        self.below.load(key, [pairs[i] for i in below])

    def landed(self) -> list[tuple[Any, int]]:
        for key, n in self.below.landed() if self.below is not None else ():
            below, whole, ram = self._from_below.pop(key)
            self._landed(key, below[n] if n < len(below) else whole, ram)
        out, self._done = self._done, []
        return out

    def _landed(self, key: Any, prefix: int, ram: list[int]) -> None:
        """A load read `prefix` blocks; RAM's count as read where they fall within it."""
        used = sum(i < prefix for i in ram)
        self._own.loaded_blocks += used
        self._own.read_bytes += used * self.blocks.shape[1]
        self._done.append((key, prefix))

    def close(self) -> None:
        if self.below is not None:
            self.below.close()
