"""Tiers below a service's KV pool: blocks the pool evicts are kept there, and a prompt whose
prefix the pool has lost loads it back instead of computing it again. A chain is configuration
(Engine): a disk tier (`kv_tier_dir`), host RAM (`kv_tier_ram_gib`: baton.cache.ram_tier),
or RAM above disk, where the blocks RAM lets go spill to the disk. Each has the interface of
`Tier`, so the pool's manager sees one tier whatever the chain.

The disk tier:

One file per block, `<dir>/<fingerprint hex>/<block hash hex>.kv`: a header, then the block's
bytes as the pool holds them (baton.cache.kv_cache: one range per block, every layer).
    magic (8) | fingerprint (16) | chained block hash (16) | payload bytes (8) | crc32 (4)
The fingerprint names the model's weights and the block layout (Engine.fingerprint). A torn,
truncated or foreign file fails the header or the checksum: it is deleted, counted, and its
tokens are computed again, never served. A file appears under its name only once whole
(written to a temporary name, then renamed).

Blocks are written behind, when the pool evicts them, and an agent session's blocks are also
written through, as they fill, so that a session survives a restart (kill -9 included) of its
service. Disk I/O runs on one worker thread, in order (a load queued after the save of the same
block finds its file); the engine loop only queues and collects, never waits on the disk. A
block's bytes are copied out at once (one memcpy: the pool may reuse it next), and the copy is
what is written; the copies waiting are capped in bytes, and an eviction beyond the cap is dropped and
counted, not waited for. Loads read straight into the pool blocks reserved for them.

Services on one host may share the directory: a block this service has not indexed is looked
for on disk (one stat) before it counts as a miss. The size cap is each service's, over the
files it knows, the least recently written or read deleted first.
"""

import logging
import os
import queue
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"BATONKV1"
HEADER = struct.Struct("<8s16s16sQI")
QUEUE_BYTES = 256 << 20  # evicted blocks' copies waiting for the disk, at most


@dataclass
class TierStats:
    """Counts since start, for the service's metrics (a chain's: the sum of its tiers')."""

    loaded_blocks: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    dropped_writes: int = 0  # evictions not kept: the queue of copies was full, or no room below
    corrupt_files: int = 0  # torn, truncated or foreign: deleted and recomputed
    deleted_files: int = 0  # over the size cap

    def __add__(self, other: "TierStats") -> "TierStats":
        return TierStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


class Level(NamedTuple):
    """One tier of a chain, for the metrics: its name, its own counts and bytes."""

    name: str  # "ram", "disk"
    stats: TierStats
    size_bytes: int


class Tier(Protocol):
    """What the pool's manager, the scheduler and the service's metrics use of a tier (or a
    chain of them). `on_stored` hears each hash the tier gains; `dropped`, once set, queues
    each it may have lost (judged on the engine thread: the pool or the tier may hold it)."""

    on_stored: Callable[[bytes], None] | None
    dropped: "queue.SimpleQueue[bytes] | None"
    stats: TierStats

    @property
    def cap_files(self) -> int: ...  # blocks it can hold
    @property
    def num_blocks(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def levels(self) -> "list[Level]": ...  # each tier of the chain on its own, top first
    def indexed(self, block_hash: bytes) -> bool: ...  # held, as far as it knows
    def holds(self, block_hash: bytes) -> bool: ...  # held, looking further if it must
    def hashes(self) -> list[bytes]: ...
    def save(self, block: int, block_hash: bytes, durable: bool = False) -> None: ...
    def put(self, block_hash: bytes, data: bytes) -> None: ...
    def load(self, key: Any, pairs: list[tuple[int, bytes]]) -> None: ...
    def landed(self) -> list[tuple[Any, int]]: ...
    def close(self) -> None: ...


class DiskTier:
    def __init__(
        self, directory: str | Path, cap_bytes: int, fingerprint: bytes, blocks: np.ndarray
    ):
        """blocks: the pool's bytes, [num_blocks, block_nbytes] uint8 (shared, not copied)."""
        assert len(fingerprint) == 16 and blocks.dtype == np.uint8 and blocks.ndim == 2
        self.fingerprint, self.blocks = fingerprint, blocks
        self.dir = Path(directory) / fingerprint.hex()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.file_nbytes = HEADER.size + blocks.shape[1]
        self.cap_files = max(1, cap_bytes // self.file_nbytes)
        self.stats = TierStats()
        self._lock = threading.Lock()  # the index: the engine thread adds, the worker evicts
        self._index: OrderedDict[bytes, None] = OrderedDict()  # on disk or queued, LRU first
        self._queued_bytes = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._scan()
        # hears each hash the index gains (on the engine thread: KVCacheManager's events);
        # what it loses, on either thread, is queued in `dropped` for the engine thread to judge
        # (the pool may hold the block, or the tier take it again, by then)
        self.on_stored: Callable[[bytes], None] | None = None
        self.dropped: queue.SimpleQueue[bytes] | None = None  # None: nobody reads them
        self._worker = threading.Thread(target=self._work, name="kv-tier", daemon=True)
        self._worker.start()

    def _scan(self) -> None:
        """Index what an earlier run (or a neighbour) left, oldest first; a file of the wrong
        size is not a block of this layout."""
        found = []
        for entry in os.scandir(self.dir):
            name = entry.name
            if not name.endswith(".kv") or len(name) != 35:
                continue
            st = entry.stat()
            if st.st_size == self.file_nbytes:
                found.append((st.st_mtime_ns, bytes.fromhex(name[:32])))
        for _, block_hash in sorted(found):
            self._index[block_hash] = None
        if found:
            log.info("KV tier %s: %d blocks from before", self.dir, len(found))

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    @property
    def size_bytes(self) -> int:
        return len(self._index) * self.file_nbytes

    @property
    def levels(self) -> list[Level]:
        return [Level("disk", self.stats, self.size_bytes)]

    def _path(self, block_hash: bytes) -> Path:
        return self.dir / f"{block_hash.hex()}.kv"

    def indexed(self, block_hash: bytes) -> bool:
        """Whether it is on disk or queued for it, as this service knows (no disk access)."""
        return block_hash in self._index

    def hashes(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def holds(self, block_hash: bytes) -> bool:
        if block_hash in self._index:
            return True
        if self._path(block_hash).exists():  # written by a service sharing the directory
            self._add(block_hash)
            return True
        return False

    def _add(self, block_hash: bytes, queued_bytes: int = 0) -> None:
        """On the engine thread (save, holds)."""
        with self._lock:
            self._index[block_hash] = None
            self._queued_bytes += queued_bytes
        if self.on_stored is not None:
            self.on_stored(block_hash)

    def _drop(self, block_hash: bytes) -> None:
        with self._lock:
            if block_hash not in self._index:
                return
            del self._index[block_hash]
        if self.dropped is not None:
            self.dropped.put(block_hash)

    def save(self, block: int, block_hash: bytes, durable: bool = True) -> None:
        """Copy `block`'s bytes now, for the disk: the pool is about to reuse it, or it is a
        session's, written through (`durable`) so that the session outlives this process."""
        self.put(block_hash, self.blocks[block])

    def put(self, block_hash: bytes, data: bytes | np.ndarray) -> None:
        """A block's bytes (a pool block's are copied here, once there is room for them)."""
        if block_hash in self._index:
            return
        if self._queued_bytes + self.blocks.shape[1] > QUEUE_BYTES:
            self.stats.dropped_writes += 1
            return
        data = bytes(data)
        self._add(block_hash, len(data))
        self._jobs.put((self._save, block_hash, data))

    def load(self, key: Any, pairs: list[tuple[int, bytes]]) -> None:
        """Read each (pool block, hash) in order, stopping at the first that fails; `landed`
        later returns (key, how many were read)."""
        self._jobs.put((self._load, key, pairs))

    def landed(self) -> list[tuple[Any, int]]:
        """The loads finished since the last call (never waits)."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Finish what is queued (writes included), then stop the worker."""
        self._jobs.put(None)
        self._worker.join()

    # --- the worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, *args = job
            try:
                fn(*args)
            except Exception:  # a full disk, a removed directory: the tier serves less, no more
                log.exception("KV tier %s", fn.__name__)

    def _save(self, block_hash: bytes, data: bytes) -> None:
        path = self._path(block_hash)
        tmp = path.with_name(f".{block_hash.hex()}.{os.getpid()}.tmp")
        header = HEADER.pack(MAGIC, self.fingerprint, block_hash, len(data), zlib.crc32(data))
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            self._drop(block_hash)
            raise
        finally:
            with self._lock:
                self._queued_bytes -= len(data)
        self.stats.written_bytes += len(data)
        self._trim()

    def _trim(self) -> None:
        while len(self._index) > self.cap_files:
            with self._lock:
                oldest = next(iter(self._index))
            self._drop(oldest)
            self._path(oldest).unlink(missing_ok=True)
            self.stats.deleted_files += 1

    def _load(self, key: Any, pairs: list[tuple[int, bytes]]) -> None:
        n = 0
        for block, block_hash in pairs:
            if not self._read(block, block_hash):
                break
            n += 1
        self._done.put((key, n))

    def _read(self, block: int, block_hash: bytes) -> bool:
        dest = self.blocks[block]
        path = self._path(block_hash)
        try:
            with open(path, "rb") as f:
                header = f.read(HEADER.size)
                got = f.readinto(memoryview(dest)) if len(header) == HEADER.size else 0
        except FileNotFoundError:  # deleted over the cap (here or by a neighbour)
            self._drop(block_hash)
            return False
        ok = len(header) == HEADER.size and got == dest.size
        if ok:
            magic, fingerprint, stored_hash, length, crc = HEADER.unpack(header)
            ok = (magic, fingerprint, stored_hash, length) == (
                MAGIC, self.fingerprint, block_hash, dest.size
            ) and crc == zlib.crc32(dest)  # fmt: skip
        if ok:
            with self._lock:
                self._index[block_hash] = None
                self._index.move_to_end(block_hash)
        else:
            self._drop(block_hash)
            self.stats.corrupt_files += 1
            path.unlink(missing_ok=True)
            log.warning("KV tier: %s is torn or foreign; deleted, its tokens recomputed", path)
            return False
        self.stats.loaded_blocks += 1
        self.stats.read_bytes += dest.size
        return True
