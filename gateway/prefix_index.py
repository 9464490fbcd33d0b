"""Which service holds a prompt's prefix in its KV cache (its pool or its KV tier).

Per service, chained block hashes (baton.cache.kv_manager.chain_hash: equal hashes, equal
prefixes), bounded by its pool and tier. Two sources: what each service publishes its cache
gained and lost (baton.cache.events: numbered batches, applied in order, a snapshot when one
was missed), and the gateway's own record of the token sequences each decode served (prompt +
output) and each prefill was sent. For a service whose batches are in step, the gateway's own
record is provisional: it counts for PROVISIONAL_S, until the service's report says what it
computed (a prompt that failed leaves nothing behind). For one out of step, it is the whole
record until a snapshot. Any entry is a hint: a block gone by the time the prompt lands is
simply computed again.
"""

import time
from collections import OrderedDict

from baton import protocol as P
from baton.cache.kv_manager import chain_hash

RESYNC_S = 1.0  # a service out of step is asked for a snapshot at most this often
PROVISIONAL_S = 2.0  # the gateway's own record counts this long where the service reports


class PrefixIndex:
    def __init__(self, block_size: int, clock=time.monotonic):
        self.block_size = block_size
        self.held: dict[str, OrderedDict[bytes, None]] = {}  # service id -> its blocks, LRU
        # service id (in step) -> blocks the gateway sent it lately, each counted until then
        self.provisional: dict[str, OrderedDict[bytes, float]] = {}
        self.seq: dict[str, int] = {}  # service id -> its last batch applied (in step)
        self.asked: dict[str, float] = {}  # service id -> when a snapshot was last asked for
        self.clock = clock

    def hashes(self, token_ids: list[int], salt: bytes | None) -> list[bytes]:
        """The chained hash of each full block of `token_ids`, from the root `salt`."""
        bs, out, parent = self.block_size, [], salt
        for i in range(len(token_ids) // bs):
            parent = chain_hash(parent, token_ids[i * bs : (i + 1) * bs])
            out.append(parent)
        return out

    def add(
        self, service_id: str, token_ids: list[int], capacity_blocks: int, salt: bytes | None
    ) -> None:
        """The gateway's own record: `token_ids`' KV is (or will be) computed on the service."""
        if service_id not in self.seq:  # it reports nothing the gateway can go by
            blocks = self.held.setdefault(service_id, OrderedDict())
            _remember(blocks, self.hashes(token_ids, salt), capacity_blocks)
            return
        now = self.clock()
        record = self.provisional.setdefault(service_id, OrderedDict())
        for h in self.hashes(token_ids, salt):
            record[h] = now + PROVISIONAL_S
            record.move_to_end(h)
        while record and (len(record) > capacity_blocks or next(iter(record.values())) <= now):
            record.popitem(last=False)  # oldest first, so the expired ones lead

    def cached_tokens(self, token_ids: list[int], salt: bytes | None) -> dict[str, int]:
        """Per service holding some of it, the leading tokens of the prompt `token_ids` (of
        the cache salt `salt`) it holds (the last prompt token never counts: its logits must
        be computed)."""
        if not self.held:  # nothing served yet: no need to hash the prompt
            return {}
        hashes = self.hashes(token_ids[:-1], salt)
        out, now = {}, self.clock()
        for service_id, blocks in self.held.items():
            guessed = self.provisional.get(service_id, {})
            n = 0
            while n < len(hashes) and (hashes[n] in blocks or guessed.get(hashes[n], now) > now):
                n += 1
            if n:
                out[service_id] = n * self.block_size
        return out

    def apply(self, service_id: str, batch: P.CacheEvents, capacity_blocks: int) -> bool:
        """A service's batch of cache events; True where a snapshot should be asked for now
        (a batch was missed: until the snapshot, the record goes on as the gateway's own)."""
        blocks = self.held.setdefault(service_id, OrderedDict())
        if batch.reset:
            blocks.clear()
        elif self.seq.get(service_id) != batch.seq - 1:
            self.seq.pop(service_id, None)
            now = self.clock()
            if service_id in self.asked and now - self.asked[service_id] < RESYNC_S:
                return False
            self.asked[service_id] = now
            return True
        self.seq[service_id] = batch.seq
        guessed = self.provisional.get(service_id, {})
        for h in batch.removed:
            blocks.pop(h, None)
            guessed.pop(h, None)
        _remember(blocks, batch.stored, capacity_blocks)
        return False

    def forget(self, service_id: str) -> None:
        """A service died or restarted: its cache is gone."""
        for record in (self.held, self.provisional, self.seq, self.asked):
            record.pop(service_id, None)


def _remember(blocks: OrderedDict[bytes, None], hashes: list[bytes], capacity: int) -> None:
    """`hashes` as the most recent of `blocks`, the oldest dropped past `capacity`."""
    for h in hashes:
        blocks[h] = None
        blocks.move_to_end(h)
    while len(blocks) > capacity:
        blocks.popitem(last=False)
