"""Streaming the KV hand-off: a prompt prefilled in chunks is offered to its decode after each
chunk, and every block offered stays pinned until the decode lets go of it, whatever happens
to the request on the prefill (a real PrefillService; the test plays its gateway and decode)."""

from itertools import pairwise

import pytest
from prefill_harness import PrefillHarness

from baton import protocol as P
from baton.config import EngineConfig
from baton.engine import Engine
from baton.request import FinishReason
from baton.sampling_params import SamplingParams

PROMPT = [(7 * i) % 500 + 3 for i in range(100)]  # 100 tokens: chunks of 32, blocks of 16


@pytest.fixture
def harness(tiny_text_model):
    config = EngineConfig(model=str(tiny_text_model), dtype="float32", num_blocks=32,
                          block_size=16, max_num_batched_tokens=32)  # fmt: skip
    h = PrefillHarness(Engine.build(config), "prefill-stream", release=False)
    yield h
    h.close()


def used(h: PrefillHarness) -> int:
    return h.service.engine.kv_manager.pool.num_used


def offers(h: PrefillHarness, req_id: str) -> list[P.KVOffer]:
    return [m for m in h.received if isinstance(m, P.KVOffer) and m.req_id == req_id]


def release(h: PrefillHarness, req_id: str) -> None:
    h.reply(h.kv.encode(P.KVRelease(req_id)))
    h.step_until(lambda: used(h) == 0)


def test_a_long_prompt_is_offered_after_each_chunk_then_whole(harness):
    h = harness
    h.request("long", token_ids=PROMPT)
    first = h.wait(P.TokenOutput, "long")
    h.step_until(lambda: any(o.final for o in offers(h, "long")))
    got = offers(h, "long")
    # full blocks after each 32-token chunk, then all 7 blocks with the first token
    assert [(o.num_computed, len(o.block_ids), o.final) for o in got] == [
        (32, 2, False), (64, 4, False), (96, 6, False), (100, 7, True),
    ]  # fmt: skip
    for earlier, later in pairwise(got):  # each extends the one before
        assert later.block_ids[: len(earlier.block_ids)] == earlier.block_ids
    assert got[-1].token_ids == [*PROMPT, first.token_id] and got[0].token_ids == PROMPT
    # the scheduler let go of the prompt; the lease holds its 7 blocks for the decode
    assert h.service.sched.running == [] and used(h) == 7
    release(h, "long")


def test_blocks_offered_mid_prefill_stay_pinned_after_an_abort_until_the_decode_lets_go(harness):
    h = harness
    h.request("gone", token_ids=PROMPT)
    h.step_until(lambda: offers(h, "gone"))
    h.send(h.up.encode(P.Abort("gone")))
    h.step_until(lambda: any(isinstance(m, P.KVAbort) for m in h.received))
    abort = next(m for m in h.received if isinstance(m, P.KVAbort))
    assert abort.req_id == "gone" and abort.end == P.HandoffEnd.ABORTED  # no error
    # the blocks not offered are free; the offered ones may still be read by the decode
    assert used(h) == len(offers(h, "gone")[-1].block_ids) > 0
    assert h.service.sched.running == [] and not h.service.sched.waiting
    release(h, "gone")


def test_a_prompt_that_finishes_at_its_first_token_lets_its_decode_go(harness):
    h = harness
    h.request("short-lived", token_ids=PROMPT, params=SamplingParams(max_tokens=1))
    assert h.wait(P.TokenOutput, "short-lived").finish_reason == FinishReason.LENGTH
    h.step_until(lambda: any(isinstance(m, P.KVAbort) for m in h.received))
    assert not any(o.final for o in offers(h, "short-lived"))
    assert used(h) == 6  # the 3 offers' blocks, pinned until the decode answers
    release(h, "short-lived")


def test_with_streaming_off_one_offer_after_the_whole_prompt(harness):
    h = harness
    h.service.sender.stream = False
    h.request("whole", token_ids=PROMPT)
    h.wait(P.TokenOutput, "whole")
    h.step_until(lambda: offers(h, "whole"))
    assert [(o.num_computed, o.final) for o in offers(h, "whole")] == [(100, True)]
    release(h, "whole")


def test_an_ended_lease_expires_even_while_its_decode_keeps_answering(harness):
    """A decode that never knew the request (it restarted) keeps the peer alive with its
    keep-alives but never releases: the pins go once the lease runs out after the end."""
    h = harness
    h.service.sender.lease_s = 0.5
    h.request("orphan", token_ids=PROMPT)
    h.step_until(lambda: offers(h, "orphan"))
    h.send(h.up.encode(P.Abort("orphan")))

    def freed_while_alive() -> bool:
        h.reply(h.kv.encode(P.KeepAlive()))
        return used(h) == 0

    h.step_until(freed_while_alive, timeout_s=10)
