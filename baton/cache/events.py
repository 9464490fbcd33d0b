"""What a service's prefix cache gains and loses, published for the gateway's index of it
(all on the engine thread: KVCacheManager judges the KV tier's worker's drops there).

A service holds a full block's chained hash while its pool caches the block or its KV tier
has the file; the gateway routes by what it holds (gateway.prefix_index). Changes are kept
here as each block's latest word (held or not) and taken as one numbered batch at a time; the
gateway applies a batch only on top of the one before it. Any batch it misses (a send dropped
on a full queue, a gateway restart, changes piling up past MAX_CHANGES) is mended by a
snapshot of everything held: sent first, after a dropped send, and when the gateway asks.
"""

from collections.abc import Callable, Iterable

from baton import protocol as P

MAX_CHANGES = 65_536  # changes kept between batches; past it the next batch is a snapshot


class CacheEvents:
    def __init__(self, snapshot: Callable[[], Iterable[bytes]]):
        """snapshot: every hash held now (taken on the loop's thread, only when one is due)."""
        self.snapshot = snapshot
        self.seq = 0
        self.reset_due = True  # the gateway knows nothing of this process yet
        self._changes: dict[bytes, bool] = {}  # hash -> held now; the latest word wins

    def stored(self, block_hash: bytes) -> None:
        self._note(block_hash, True)

    def removed(self, block_hash: bytes) -> None:
        self._note(block_hash, False)

    def _note(self, block_hash: bytes, held: bool) -> None:
        if self.reset_due:  # the snapshot will say it
            return
        self._changes[block_hash] = held
        if len(self._changes) > MAX_CHANGES:
            self._changes.clear()
            self.reset_due = True

    def take(self) -> P.CacheEvents | None:
        """The next batch: the changes since the last, or a snapshot; None with neither."""
        changes, self._changes = self._changes, {}
        reset, self.reset_due = self.reset_due, False
        if not changes and not reset:
            return None
        self.seq += 1
        if reset:
            held = list(self.snapshot())[: P.MAX_CACHE_EVENTS]
            return P.CacheEvents(self.seq, held, [], reset=True)
        stored = [h for h, held in changes.items() if held]
        removed = [h for h, held in changes.items() if not held]
        return P.CacheEvents(self.seq, stored, removed)

    def resync(self) -> None:
        """The gateway missed a batch (or asks after its restart): send everything next."""
        self._changes.clear()
        self.reset_due = True
