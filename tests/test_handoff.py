"""The KV hand-off as plain state: a KVSender (prefill) and a KVReceiver (decode) wired to each
other in memory, each over a real scheduler and block pool, with no model and no sockets.
Every ending leaves every block back in both pools and no sequence left to run."""

import itertools

import pytest
import torch
from handoff_harness import (
    BLOCK,
    DECODE,
    LAYOUT,
    NUM_BLOCKS,
    PROMPT,
    TIMEOUT_S,
    Pair,
    assert_all_free,
    joined,
)

from baton import protocol as P
from baton.kvtransfer.base import Stop, Window
from baton.request import Sequence
from baton.sampling_params import SamplingParams


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
