"""KV blocks over shared memory, for a prefill and a decode on one host.

The prefill's whole KV pool lives in a file in /dev/shm (`Segment`); a decode maps it once,
at the handshake (`ShmReader`), and copies leased blocks out of it by index: one `copy_` per
run of blocks that are consecutive on both sides (indexing a uint8 view with an id list is
~10x slower; shared/machine.md).

No segment outlives its owner for long. It is named baton-kv-<pid>-<random>, and the owner
holds an flock on it while it lives; the kernel drops the lock when the process dies, even
by kill -9. So "nobody holds the lock and the pid is gone" means "owner dead": `sweep()`
unlinks those files. Every service sweeps at start and a decode sweeps when a peer goes
silent; the owner unlinks its own file at exit. A decode's mapping stays valid after the
unlink, until it forgets the peer.
"""

import atexit
import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import stat

import torch

from baton import protocol as P
from baton.kvtransfer.base import InPart, Landed, read_nbytes, split_runs

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "baton-kv-"


def _map(fd: int, nbytes: int, populate: bool = False) -> torch.Tensor:
    """The file as a flat uint8 tensor; the tensor keeps the mapping alive. populate: every
    page mapped now (the owner's pool), as a private pool is touched at start: its RSS is
    whole from the start, not growing as prompts first reach each block (which read as a
    leak: +1 GiB over 15 minutes of a soak), and no step takes those faults."""
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return torch.frombuffer(mmap.mmap(fd, nbytes, flags=flags), dtype=torch.uint8)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def segments() -> list[str]:
    return sorted(f"{SHM_DIR}/{n}" for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))


def open_own(path: str, flags: int) -> int:
    """Open a segment only if it is a regular file of ours: never a FIFO (whose open would
    block), a symlink, or another user's file (two users' stacks on one host). Raises
    OSError, or ValueError for a file that is not ours."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise ValueError(f"{path} is not a regular file of this user")
    return fd


def sweep() -> list[str]:
    """Unlink the segments of dead owners; returns their paths. What is not a segment of
    ours is left alone."""
    removed = []
    for path in segments():
        try:
            pid = int(os.path.basename(path)[len(PREFIX) :].split("-")[0])
            fd = open_own(path, os.O_RDONLY)
        except (ValueError, OSError):
            continue
        try:
            # the pid check covers the moment between an owner's create and its flock
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _pid_alive(pid):
                _unlink(path)
                removed.append(path)
        except BlockingIOError:
            pass  # the owner holds it
        finally:
            os.close(fd)
    return removed


class Segment:
    """A KV pool in /dev/shm. Pass `create` to Engine.build as the pool's storage; `region`
    is what the prefill offers in Hello (None if the pool could not be shared)."""

    def __init__(self, required: bool) -> None:
        """required: exit when /dev/shm cannot hold the pool; else fall back to private
        memory (no shm transport for this service), with a log line saying why."""
        self.required = required
        self.region: P.ShmRegion | None = None

    def create(self, nbytes: int) -> torch.Tensor:
        """A zeroed (fresh tmpfs pages), locked, shared pool of `nbytes`."""
        sweep()
        path = f"{SHM_DIR}/{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # fd stays open for the process's life: it holds the lock
        atexit.register(_unlink, path)
        try:
            # reserve every page now: a /dev/shm too small (docker's default is 64 MiB)
            # fails here, instead of killing the service with SIGBUS when the pool fills up
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            _unlink(path)
            os.close(fd)
            st = os.statvfs(SHM_DIR)
            why = (
                f"{SHM_DIR} cannot hold the {nbytes / 2**30:.2f} GiB KV pool "
                f"({st.f_bavail * st.f_frsize / 2**30:.2f} GiB free; docker: --shm-size): {e}"
            )
            if self.required:
                raise SystemExit(f"--transport shm: {why}") from e
            log.warning("KV pool in private memory, so no shm transport: %s", why)
            return torch.zeros(nbytes, dtype=torch.uint8)
        self.region = P.ShmRegion(path, nbytes)
        return _map(fd, nbytes, populate=True)


class ShmReader:
    """A peer's shared pool, mapped once; reads are synchronous copies."""

    transport = "shm"

    def __init__(self, region: P.ShmRegion, pool: torch.Tensor):
        """pool: our [num_blocks, block_nbytes] uint8 pool. Raises OSError if the file is not
        here (another host) and ValueError if it is not a regular file of this user or its
        size is not what the peer announced."""
        if os.path.dirname(region.path) != SHM_DIR or not os.path.basename(region.path).startswith(
            PREFIX
        ):  # a peer names the file: only ever a baton KV segment
            raise ValueError(f"{region.path!r} is not a baton KV segment in {SHM_DIR}")
        fd = open_own(region.path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != region.nbytes or size % pool.shape[1]:
                raise ValueError(f"{region.path} has {size} bytes, announced {region.nbytes}")
            self.src = _map(fd, size).view(-1, pool.shape[1])
        finally:
            os.close(fd)  # the mapping does not need it
        self.dst = pool
        self.landed: list[Landed] = []

    def start(
        self, req_id: str, src_ids: list[int], dst_ids: list[int], in_part: InPart | None = None
    ) -> None:
        part, whole = split_runs(src_ids, dst_ids, in_part)
        for s, d, n in part:
            for offset, size in in_part.ranges:
                cols = slice(offset, offset + size)
                self.dst[d : d + n, cols].copy_(self.src[s : s + n, cols])
        for s, d, n in whole:
            self.dst[d : d + n].copy_(self.src[s : s + n])
        nbytes = read_nbytes(len(src_ids), self.dst.shape[1], in_part)
        self.landed.append(Landed(req_id, nbytes, len(part) + len(whole)))

    def poll(self) -> list[Landed]:
        landed, self.landed = self.landed, []
        return landed

    def cancel(self, req_id: str) -> bool:
        return True  # copies finish inside start()

    def close(self) -> None:
        del self.src  # unmaps once no view of it is left
