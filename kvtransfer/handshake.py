"""Which transport a prefill/decode pair uses: chosen once, by the decode, when the prefill's
Hello arrives (over ZeroMQ, which carries every control message whatever moves the bytes).

Each side is configured with one of baton.config.Transport. If both name a transport other
than `auto`, they must agree; one named transport wins over `auto`; with `auto` on both
sides the decode tries shared memory (works only on the prefill's host), then NIXL, then
ZeroMQ, and logs why it skipped each. A named transport that cannot work refuses the peer
(fail fast): no silent fallback.
"""

import logging
from collections.abc import Callable

import torch

from baton import protocol as P
from baton.kvtransfer import nixl, shm
from baton.kvtransfer.base import Reader, TransferError

log = logging.getLogger(__name__)

AUTO_ORDER = ("shm", "nixl", "zmq")


class Refused(Exception):
    """The pair cannot exchange KV; the reason goes back in HelloReply."""


def kind(transport: str) -> str:
    """zmq-tcp and zmq-ipc are one transport here: the decode's socket decides which."""
    return "zmq" if transport.startswith("zmq") else transport


def start_nixl(transport: str, name: str, pool: torch.Tensor) -> nixl.Agent | None:
    """This service's NIXL agent if its transport may use NIXL; exits if it must and cannot."""
    if kind(transport) not in ("auto", "nixl"):
        return None
    why = nixl.unavailable()
    if why is None:
        return nixl.Agent(name, pool)
    if transport == "nixl":
        raise SystemExit(f"--transport nixl: {why}")
    log.warning("KV over NIXL is off: %s", why)
    return None


def choose(
    hello: P.Hello,
    transport: str,
    pool: torch.Tensor,
    agent: nixl.Agent | None,
    zmq_reader: Callable[[], Reader],
) -> tuple[Reader, list[str]]:
    """The reader for this peer and why each transport tried before it was skipped.

    pool: our [num_blocks, block_nbytes] uint8 pool, the destination of every read.
    Raises Refused."""
    wants = {kind(t) for t in (transport, hello.transport)} - {"auto"}
    if len(wants) > 1:
        raise Refused(f"transports differ: prefill {hello.transport}, decode {transport}")
    pool_nbytes = hello.num_blocks * hello.layout.block_nbytes
    skipped = []
    for t in wants or AUTO_ORDER:
        try:
            if t == "zmq":
                return zmq_reader(), skipped
            region = hello.shm if t == "shm" else hello.nixl
            if region is None:
                raise ValueError(f"the prefill offers no {t} region")
            if region.nbytes != pool_nbytes:
                raise ValueError(f"its {t} region has {region.nbytes} B, its pool {pool_nbytes} B")
            if isinstance(region, P.ShmRegion):
                return shm.ShmReader(region, pool), skipped
            if agent is None:
                raise ValueError("NIXL is off in this decode")
            return nixl.NixlReader(agent, region), skipped
        except FileNotFoundError:
            skipped.append(f"{t}: the prefill's segment is not here (another host)")
        except (OSError, ValueError, TransferError) as e:
            skipped.append(f"{t}: {e}")
    raise Refused("; ".join(skipped))
