"""Which service likely still holds a prompt's prefix in its KV cache.

The gateway's own record of the token sequences each decode served (prompt + output) and each
prefill computed (prompts), as chained block hashes (baton.cache.kv_manager.chain_hash: equal
hashes, equal prefixes), LRU per service and bounded by its pool. An estimate: the service may
have evicted blocks since (to its KV tier, if it has one, which reads them back), and then it
simply computes more of the prompt itself.
"""

from collections import OrderedDict

from baton.cache.kv_manager import chain_hash


class PrefixIndex:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.held: dict[str, OrderedDict[bytes, None]] = {}  # service id -> its blocks, LRU

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
        blocks = self.held.setdefault(service_id, OrderedDict())
        for h in self.hashes(token_ids, salt):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > capacity_blocks:
            blocks.popitem(last=False)

    def cached_tokens(self, token_ids: list[int], salt: bytes | None) -> dict[str, int]:
        """Per service holding some of it, the leading tokens of the prompt `token_ids` (of
        the cache salt `salt`) it holds (the last prompt token never counts: its logits must
        be computed)."""
        if not self.held:  # nothing served yet: no need to hash the prompt
            return {}
        hashes = self.hashes(token_ids[:-1], salt)
        out = {}
        for service_id, blocks in self.held.items():
            n = 0
            while n < len(hashes) and hashes[n] in blocks:
                n += 1
            if n:
                out[service_id] = n * self.block_size
        return out

    def forget(self, service_id: str) -> None:
        """A service died or restarted: its cache is gone."""
        self.held.pop(service_id, None)
