"""What the hand-off tests share: a KVSender (prefill) and a KVReceiver (decode) wired to each
other in memory, each over a real scheduler and block pool, with no model and no sockets."""

import torch

from baton import protocol as P
from baton.cache.kv_manager import KVCacheManager
from baton.kvtransfer.base import Landed, Stop, Window
from baton.kvtransfer.receiver import KVReceiver
from baton.kvtransfer.sender import KVSender
from baton.kvtransfer.zmq import ZmqReader
from baton.request import SeqStatus, Sequence
from baton.sampling_params import SamplingParams
from baton.scheduler import SampledToken, Scheduler

BLOCK, BLOCK_NBYTES, NUM_BLOCKS = 4, 8, 16
PROMPT = list(range(10, 20))  # 10 tokens: a chunk of 8 (2 full blocks), then 2 more
LAYOUT = P.KVLayout("tiny", "float32", BLOCK, 1, 1, 1, BLOCK_NBYTES)
DECODE = "tcp://decode:1"  # the sender's name for the decode; the decode's for it: b"p"
LEASE_S, TIMEOUT_S = 60.0, 30.0


def scheduler(budget: int) -> Scheduler:
    return Scheduler(
        KVCacheManager(NUM_BLOCKS, BLOCK),
        max_num_seqs=4,
        max_num_batched_tokens=budget,
        max_chunk_tokens=budget,
        max_model_len=64,
        eos_token_ids=frozenset(),
    )


class OneSidedReader:
    """A read the test lands (or fails) when it says, as shm and NIXL land on their own."""

    transport = "shm"

    def __init__(self, stuck: bool = False):
        self.reading: dict[str, tuple[list[int], list[int]]] = {}
        self.landed: list[Landed] = []
        self.stuck = stuck  # cancel() cannot stop a read
        self.closed = False

    def start(self, req_id, src_ids, dst_ids, in_part=None):
        self.reading[req_id] = (src_ids, dst_ids)
        self.in_part = in_part

    def land(self, error: str | None = None) -> None:
        for req_id, (src, _) in self.reading.items():
            self.landed.append(Landed(req_id, len(src) * BLOCK_NBYTES, 1, error))
        self.reading.clear()

    def poll(self):
        landed, self.landed = self.landed, []
        return landed

    def cancel(self, req_id):
        if self.stuck:
            return False
        self.reading.pop(req_id, None)
        return True

    def close(self):
        self.reading.clear()
        self.closed = True


class Pair:
    """A prefill and a decode, their messages queued until `deliver`; time moves by `advance`."""

    def __init__(
        self,
        reader: str = "zmq",
        stream: bool = True,
        stuck: bool = False,
        window: Window | None = None,
    ):
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        self.to_decode: list[tuple[object, list]] = []
        self.sent: list[tuple[str, object]] = []  # (address, message): every send, kept
        self.to_prefill: list[object] = []
        self.p_sched, self.d_sched = scheduler(budget=8), scheduler(budget=64)
        gen = torch.Generator().manual_seed(0)
        self.p_bytes = torch.randint(0, 256, (NUM_BLOCKS, BLOCK_NBYTES), generator=gen).byte()
        self.d_bytes = torch.zeros(NUM_BLOCKS, BLOCK_NBYTES, dtype=torch.uint8)
        hello = P.Hello("prefill", LAYOUT, NUM_BLOCKS, "auto")
        self.sender = KVSender(
            "prefill", hello, self.p_sched.kv.pool, self.p_bytes, BLOCK,
            self._to_decode,
            LEASE_S, stream, clock,
        )  # fmt: skip
        self.one_sided = OneSidedReader(stuck)

        def choose(hello, send):
            if reader == "zmq":
                return ZmqReader("zmq-tcp", send, self.d_bytes), []
            return self.one_sided, []

        self.receiver = KVReceiver(
            "decode", self.d_sched, LAYOUT, "auto", choose,
            lambda peer, msg: self.to_prefill.append(msg), TIMEOUT_S, TIMEOUT_S, clock,
            window=window,
        )  # fmt: skip
        self.prefill_stops: list[Stop] = []
        self.decode_stops: list[Stop] = []

    def _to_decode(self, addr: str, msg, frames) -> None:
        self.sent.append((addr, msg))
        self.to_decode.append((msg, [bytearray(f) for f in frames]))

    # --- the services' parts, as prefill/service.py and decode/service.py play them -------
    def submit(self, req_id: str = "r", max_tokens: int = 8) -> Sequence:
        seq = Sequence(req_id, PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0))
        self.p_sched.add(seq)
        self.sender.route(req_id, DECODE)
        return seq

    def prefill_step(self) -> None:
        """One prefill step: a chunk is offered as it completes; token 0 hands it off."""
        batch = self.p_sched.schedule()
        sampled = [SampledToken(7) if s.samples else None for s in batch]
        finished = set(self.p_sched.postprocess(batch, sampled))
        for s, token in zip(batch, sampled, strict=True):
            if token is None:
                self.sender.on_chunk(s.seq)
            elif self.sender.hand_off(s.seq, s.seq in finished):
                self.p_sched.hand_off(s.seq)
        self.prefill_apply()

    def read_started(self) -> None:
        """A request prefilled whole (unstreamed: one offer) and its offer delivered: the
        decode's read of it is in flight."""
        self.submit()
        self.prefill_step()
        self.prefill_step()
        self.deliver()

    def prefill_apply(self) -> None:
        for stop in self.sender.stops():
            self.p_sched.abort(stop.req_id)
            self.prefill_stops.append(stop)

    def decode_apply(self) -> None:
        self.receiver.pull()
        for stop in self.receiver.stops():
            self.d_sched.abort(stop.req_id)
            self.decode_stops.append(stop)

    def abort_at_prefill(self, req_id: str = "r") -> None:
        self.p_sched.abort(req_id)
        self.sender.end(req_id, "aborted by the gateway")

    def abort_at_decode(self, req_id: str = "r") -> None:
        if self.d_sched.abort(req_id) is None:
            self.receiver.abort(req_id)
        self.decode_apply()

    def deliver(self) -> None:
        """Every queued message, both ways, until none is left."""
        while self.to_decode or self.to_prefill:
            to_decode, self.to_decode = self.to_decode, []
            for msg, frames in to_decode:
                self.receiver.on_message(b"p", msg, frames)
            self.decode_apply()
            to_prefill, self.to_prefill = self.to_prefill, []
            for msg in to_prefill:
                self.sender.on_message(DECODE, msg)
            self.prefill_apply()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.sender.expire()
        self.prefill_apply()
        self.receiver.check_timeouts()
        self.decode_apply()

    def settle(self) -> None:
        """Deliver, land what is read, and let every lease and timeout run out."""
        for _ in range(4):
            self.deliver()
            self.one_sided.land()
            self.decode_apply()
            self.deliver()
        self.advance(LEASE_S + TIMEOUT_S + 1)
        self.deliver()

    def decode_seqs(self) -> list[Sequence]:
        return [*self.d_sched.running, *self.d_sched.waiting]


def joined(pair: Pair) -> Sequence:
    (seq,) = pair.decode_seqs()
    assert seq.status == SeqStatus.WAITING and seq.num_computed_tokens == len(PROMPT)
    return seq


def assert_all_free(pair: Pair) -> None:
    for seq in pair.decode_seqs():  # a joined request runs to its end (here: is ended)
        pair.d_sched.abort(seq.req_id)
    assert not pair.receiver.pending and not pair.d_sched.waiting_for_kv
    assert not pair.sender.leases and not pair.sender.routes
    assert pair.p_sched.kv.pool.num_used == 0 and pair.d_sched.kv.pool.num_used == 0
    pair.p_sched.kv.pool.check_invariants()
    pair.d_sched.kv.pool.check_invariants()
