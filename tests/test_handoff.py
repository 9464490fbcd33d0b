"""The KV hand-off as plain state: a KVSender (prefill) and a KVReceiver (decode) wired to each
other in memory, each over a real scheduler and block pool, with no model and no sockets.
Every ending leaves every block back in both pools and no sequence left to run."""

import itertools

import pytest
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


@pytest.mark.parametrize("reader", ["zmq", "one-sided"])
def test_a_streamed_prompt_lands_whole_and_joins_the_queue(reader):
    pair = Pair(reader)
    pair.submit()
    pair.prefill_step()  # 8 tokens: two full blocks offered while the rest computes
    pair.deliver()
    pair.one_sided.land()
    pair.prefill_step()  # the last 2 tokens and token 0: the final offer
    pair.deliver()
    pair.one_sided.land()
    pair.decode_apply()
    pair.deliver()
    seq = joined(pair)
    assert seq.token_ids == [*PROMPT, 7] and len(seq.block_ids) == 3
    assert not pair.sender.leases  # released once everything landed
    if reader == "zmq":  # the bytes are the prefill's, block for block
        assert torch.equal(pair.d_bytes[seq.block_ids[:2]], pair.p_bytes[[0, 1]])
    assert not pair.prefill_stops and not pair.decode_stops
    assert_all_free(pair)


def test_the_blocks_the_decode_caches_already_are_not_read_again():
    """An agent's next turn handed off to the decode that served the last: the prompt's
    leading blocks are in its prefix cache, so only the rest is read."""
    pair = Pair("one-sided", stream=False)
    kv = pair.d_sched.kv
    earlier = Sequence("earlier", [*PROMPT[:8], 3], SamplingParams())  # its two full blocks
    kv.match_prefix(earlier)
    kv.allocate(earlier, earlier.num_tokens)
    earlier.num_computed_tokens = earlier.num_tokens
    kv.cache_computed(earlier)
    cached = list(earlier.block_ids[:2])
    kv.free(earlier)
    pair.read_started()
    ((src, dst),) = pair.one_sided.reading.values()
    assert src == [2] and len(dst) == 1  # the prefill's third block only
    pair.one_sided.land()
    pair.decode_apply()
    pair.deliver()
    seq = joined(pair)
    assert seq.block_ids[:2] == cached and pair.d_sched.num_prefix_hit_tokens == 8
    assert_all_free(pair)


@pytest.mark.parametrize(
    ("reader", "ranges"), [("zmq", ((0, 3),)), ("one-sided", ())], ids=["some slide", "all slide"]
)
def test_blocks_behind_a_sliding_window_are_read_only_in_the_full_layers(reader, ranges):
    """Sliding layers of 3 positions: the decode's first query, at 10 (after the prompt),
    sees 8-10 through them, so blocks 0-1 (tokens 0-7) are read only in the other layers'
    bytes (`ranges`), or not at all where every layer slides; the sequence's blocks are then
    never published for prefix hits (a shorter prompt would need what was left out)."""
    pair = Pair(reader, stream=False, window=Window(3, BLOCK, ranges))
    pair.read_started()
    if reader == "one-sided":
        ((src, _),) = pair.one_sided.reading.values()
        assert src == [2] and pair.one_sided.in_part is None  # blocks 0-1: nothing to read
        pair.one_sided.land()
        pair.decode_apply()
        pair.deliver()
    seq = joined(pair)
    if reader == "zmq":
        got = pair.d_bytes[seq.block_ids]
        assert torch.equal(got[:2, :3], pair.p_bytes[:2, :3]) and not got[:2, 3:].any()
        assert torch.equal(got[2], pair.p_bytes[2])
    assert seq.kv_in_part and seq.num_cached_blocks == 0
    pair.d_sched.kv.cache_computed(seq)
    assert pair.d_sched.kv.held_hashes() == []  # nothing of it for a later prompt to match
    assert_all_free(pair)


def test_an_abort_that_overtakes_the_offer_leaves_no_orphan_sequence():
    """The gateway's Abort reaches the decode before the prefill's offer does; shm and NIXL
    read at once, so the prefill's KVAbort would come too late: the offer is let go."""
    pair = Pair("one-sided", stream=False)
    pair.submit()
    pair.prefill_step()
    pair.prefill_step()  # handed off: the final offer is on its way
    pair.abort_at_decode()
    pair.deliver()
    pair.one_sided.land()
    pair.decode_apply()
    pair.abort_at_prefill()  # too late for the prefill: its lease had ended
    pair.deliver()
    assert pair.decode_seqs() == [] and not pair.decode_stops
    assert_all_free(pair)


def test_a_read_that_cannot_be_stopped_keeps_its_blocks_out_of_the_pool():
    pair = Pair("one-sided", stream=False, stuck=True)
    pair.read_started()  # the read starts and never lands
    used = pair.d_sched.kv.pool.num_used
    pair.now += TIMEOUT_S + 1
    pair.receiver.on_message(b"p", P.KeepAlive(), [])  # alive, but the read is stuck
    pair.advance(0)  # the hand-off fails, retryable
    assert pair.decode_stops == [Stop("r", "prefill prefill did not send the KV in time")]
    assert pair.d_sched.kv.pool.num_used == used == 3  # never handed out again
    pair.deliver()
    assert not pair.sender.leases and pair.p_sched.kv.pool.num_used == 0
    pair.one_sided.land()  # the read ends at last: now nothing writes them
    pair.decode_apply()
    assert pair.d_sched.kv.pool.num_used == 0


def test_a_forgotten_prefills_stuck_read_is_watched_until_it_ends_and_frees_its_blocks():
    # review L13: a prefill that stops answering mid-read is forgotten; its reader must still be
    # polled (not closed, nor waited on), so the read's blocks return once it ends
    pair = Pair("one-sided", stream=False, stuck=True)
    pair.read_started()  # the read starts and never lands
    pair.now += TIMEOUT_S + 1  # not a word from the prefill since
    pair.receiver.keepalive()  # forgets it
    pair.advance(0)
    assert pair.decode_stops == [Stop("r", "prefill prefill stopped answering")]
    assert not pair.receiver.peers and not pair.one_sided.closed
    assert pair.d_sched.kv.pool.num_used == 3
    pair.one_sided.land()
    pair.decode_apply()
    assert pair.d_sched.kv.pool.num_used == 0 and pair.one_sided.closed


def test_a_failed_read_fails_the_request_retryable_and_frees_both_sides():
    pair = Pair("one-sided", stream=False)
    pair.read_started()
    pair.one_sided.land(error="peer gone")
    pair.decode_apply()
    pair.deliver()
    (stop,) = pair.decode_stops
    assert stop.retryable and "peer gone" in stop.why
    assert_all_free(pair)


def test_a_restarted_prefill_says_hello_again_and_its_pending_requests_fail():
    pair = Pair("one-sided", stream=False)
    pair.read_started()  # offered, read in flight
    pair.receiver.on_message(b"p", P.Hello("prefill", LAYOUT, NUM_BLOCKS, "auto"), [])
    pair.decode_apply()
    assert [s.req_id for s in pair.decode_stops] == ["r"]
    pair.settle()
    assert_all_free(pair)


def test_a_repeated_final_offer_is_dropped_not_reserved_twice():
    pair = Pair("zmq", stream=False)
    pair.submit()
    pair.prefill_step()
    pair.prefill_step()
    offer = pair.to_decode[-1][0]
    pair.to_decode.append((offer, []))
    pair.deliver()
    joined(pair)
    assert_all_free(pair)


# Every ordering of the events one request's hand-off can meet, with and without the gateway's
# Abort (it tells both services; either may hear first) and the prefill's death. The prefill's
# messages reach the decode in order (one socket): each `deliver` hands over what is queued,
# `land` lands the one-sided reads started so far (ZeroMQ's land as their frames arrive).
ALWAYS = ("chunk", "final", "deliver", "deliver", "land")
OPTIONAL = (("abort-decode", "abort-prefill"), ("death",))


def orders():
    for k in range(len(OPTIONAL) + 1):
        for extra in itertools.combinations(OPTIONAL, k):
            yield from sorted(set(itertools.permutations(ALWAYS + sum(extra, ()))))


def run(reader: str, order: tuple[str, ...]) -> Pair:
    pair = Pair(reader)
    pair.submit()
    for event in order:
        if event in ("chunk", "final") and (pair.p_sched.running or pair.p_sched.waiting):
            pair.prefill_step()
        elif event == "deliver":
            pair.deliver()
        elif event == "land":
            pair.one_sided.land()
            pair.decode_apply()
        elif event == "abort-decode":
            pair.abort_at_decode()
        elif event == "abort-prefill":
            pair.abort_at_prefill()
        elif event == "death" and b"p" in pair.receiver.peers:  # silent: the decode forgets it
            pair.receiver.forget(b"p", "stopped answering")
            pair.decode_apply()
    pair.settle()
    return pair


@pytest.mark.parametrize("reader", ["zmq", "one-sided"])
def test_every_ordering_ends_with_every_block_back_and_nothing_orphaned(reader):
    n = 0
    for order in orders():
        pair = run(reader, order)
        if "abort-decode" in order:  # nothing decodes a request the gateway ended
            assert pair.decode_seqs() == [], order
            assert all(s.why is None for s in pair.prefill_stops), order
            failed_first = "death" in order and order.index("death") < order.index("abort-decode")
            if not failed_first:
                assert pair.decode_stops == [], order  # nor fails it
        elif "death" not in order:  # nothing went wrong: it runs on at the decode
            assert joined(pair).token_ids == [*PROMPT, 7], order
            assert pair.decode_stops == [] and pair.prefill_stops == [], order
        elif not pair.decode_seqs():  # the decode forgot the prefill before it landed
            assert pair.decode_stops and all(s.retryable for s in pair.decode_stops), order
        assert_all_free(pair)
        n += 1
    assert n == 60 + 2520 + 360 + 20160


def test_only_the_decode_offered_a_prompt_may_pull_its_blocks():
    """Reliability review L10: any decode the prefill spoke to could pull another's blocks
    by naming their request."""
    pair = Pair("zmq", stream=False)
    sent = pair.sent
    other = "tcp://other-decode:1"
    pair.submit("r")
    pair.p_sched.add(Sequence("r2", PROMPT, SamplingParams(max_tokens=8, temperature=0)))
    pair.sender.route("r2", other)
    for _ in range(4):  # both prompts prefilled and offered, each to its own decode
        pair.prefill_step()
    offers = {m.req_id: (addr, m) for addr, m in sent if isinstance(m, P.KVOffer) and m.final}
    assert {k: a for k, (a, _) in offers.items()} == {"r": DECODE, "r2": other}
    pair.sender.on_message(other, P.KVPull("r", offers["r"][1].block_ids))
    assert sent[-1] == (other, P.KVAbort("r", "no longer held"))
    pair.sender.on_message(DECODE, P.KVPull("r", offers["r"][1].block_ids))
    assert sent[-1][0] == DECODE and isinstance(sent[-1][1], P.KVBlocks)
