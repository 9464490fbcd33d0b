"""The continuous-batching scheduler as plain state: no model, sampled tokens supplied here."""

import pytest

from baton.cache.kv_manager import KVCacheManager
from baton.request import FinishReason, SeqStatus, Sequence
from baton.sampling_params import SamplingParams
from baton.scheduler import SampledToken, Scheduler

EOS = 2


def make(num_blocks=16, budget=8, max_seqs=4, chunk=None, window=None) -> Scheduler:
    return Scheduler(
        KVCacheManager(num_blocks, block_size=4),
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_chunk_tokens=chunk,
        max_model_len=64,
        eos_token_ids=frozenset({EOS}),
        window=window,
    )


def step(s: Scheduler, token: int = 5):
    batch = s.schedule()
    plan = [(x.seq.req_id, x.num_new_tokens) for x in batch]
    finished = s.postprocess(batch, [SampledToken(token) if x.samples else None for x in batch])
    return plan, [f.req_id for f in finished]


def test_chunked_prefill_then_decode_within_the_token_budget():
    s = make(budget=8, chunk=8)
    s.add(Sequence("long", list(range(10, 30)), SamplingParams(max_tokens=2)))
    s.add(Sequence("short", [10, 11, 12], SamplingParams(max_tokens=2)))
    assert step(s) == ([("long", 8)], [])
    assert step(s) == ([("long", 8)], [])
    assert step(s) == ([("long", 4), ("short", 3)], [])  # the prompt ends: both sample
    assert step(s) == ([("long", 1), ("short", 1)], ["long", "short"])
    assert not s.has_work and s.kv.pool.num_used == 0


def test_chunk_cap_lets_short_prompts_in_beside_a_long_one():
    s = make(budget=8, chunk=4)
    s.add(Sequence("long", list(range(10, 30)), SamplingParams(max_tokens=1)))
    s.add(Sequence("short", [10, 11], SamplingParams(max_tokens=1)))
    assert step(s)[0] == [("long", 4), ("short", 2)]


def test_prompt_chunks_beside_decoding_sequences_stay_within_the_prompt_cap():
    s = make(budget=16, chunk=16)
    s.prompt_cap = 3  # what the decode's TPOT slack leaves for prompt tokens
    s.add(Sequence("talk", [10, 11], SamplingParams(max_tokens=8)))
    assert step(s)[0] == [("talk", 2)]  # nothing decodes yet: the whole budget
    s.add(Sequence("long", list(range(10, 20)), SamplingParams(max_tokens=2)))
    s.add(Sequence("next", [30, 31], SamplingParams(max_tokens=1)))
    # talk decodes: the prompts beside it share 3 tokens a step, in order of arrival
    assert step(s)[0] == [("talk", 1), ("long", 3)]
    assert step(s)[0] == [("talk", 1), ("long", 3)]
    assert step(s)[0] == [("talk", 1), ("long", 3)]
    assert step(s)[0] == [("talk", 1), ("long", 1), ("next", 2)]
    assert step(s)[0] == [("talk", 1), ("long", 1)]  # long's last prompt token, then decodes
    s.prompt_cap = None
    s.add(Sequence("late", list(range(40, 50)), SamplingParams(max_tokens=1)))
    assert step(s)[0] == [("talk", 1), ("late", 10)]


def test_a_prompt_alone_takes_the_budget_and_half_of_it_while_others_wait():
    s = make(budget=8)
    s.add(Sequence("long", list(range(10, 30)), SamplingParams(max_tokens=1)))
    assert step(s)[0] == [("long", 8)]
    s.add(Sequence("short", [50, 51, 52, 53, 54], SamplingParams(max_tokens=1)))
    # a newcomer waits out one full step (4 + 4), then starts beside 4 of long and 1 of short
    assert s.ahead_tokens() == 4 + 4 + 4 + 1
    assert step(s)[0] == [("long", 4), ("short", 4)]
    s.add(Sequence("other", [60, 61], SamplingParams(max_tokens=1)))
    assert s.ahead_tokens() == 4 + 1 + 2  # one chunk of long, the rest of short and other


def test_behind_prompts_of_the_same_length_a_newcomer_waits_for_all_of_them():
    s = make(budget=8, num_blocks=64)
    for i in range(4):
        s.add(Sequence(f"p{i}", [100 * i + t for t in range(12)], SamplingParams(max_tokens=1)))
    # steps of 4 + 4 tokens: p0 and p1 after 3 steps, p2 and p3 after 3 more; 48 in all
    assert s.ahead_tokens() == 48


def test_stops_on_eos_unless_ignored_and_respects_min_tokens():
    s = make()
    s.add(Sequence("eos", [9, 9], SamplingParams(max_tokens=5)))
    s.add(Sequence("ignore", [9, 9], SamplingParams(max_tokens=2, ignore_eos=True)))
    s.add(Sequence("min", [9, 9], SamplingParams(max_tokens=5, min_tokens=2)))
    assert step(s, EOS)[1] == ["eos"]
    assert step(s, EOS)[1] == ["ignore", "min"]


def test_preempts_the_newest_sequence_when_blocks_run_out_and_recomputes_it():
    s = make(num_blocks=4, budget=16)
    a = Sequence("a", [1] * 8, SamplingParams(max_tokens=6, ignore_eos=True))
    b = Sequence("b", [3] * 8, SamplingParams(max_tokens=6, ignore_eos=True))
    s.add(a)
    s.add(b)
    assert step(s)[0] == [("a", 8), ("b", 8)]  # 2 + 2 blocks: the pool is full
    plan, _ = step(s)  # both now need a third block: b (newest) is preempted
    assert plan == [("a", 1)]
    assert b.num_computed_tokens == 0 and b.block_ids == [] and list(s.waiting) == [b]
    assert s.num_preemptions == 1
    while s.has_work:
        step(s)
    assert a.output_token_ids == [5] * 6 and b.output_token_ids == [5] * 6
    assert s.kv.pool.num_used == 0


def test_abort_frees_blocks_wherever_the_request_is():
    s = make()
    s.add(Sequence("run", [1, 2, 3, 4, 5], SamplingParams(max_tokens=9)))
    s.add(Sequence("wait", [1] * 5, SamplingParams(max_tokens=9)))
    step(s)
    aborted = s.abort("run")
    assert aborted.finish_reason is FinishReason.ABORT
    assert s.abort("wait").finish_reason is FinishReason.ABORT
    assert s.abort("nobody") is None
    assert s.kv.pool.num_used == 0 and not s.has_work


def test_requests_that_can_never_fit_are_refused_with_the_numbers():
    s = make(num_blocks=4)
    with pytest.raises(ValueError, match="prompt has 64 tokens; the context limit is 64"):
        s.add(Sequence("x", [1] * 64, SamplingParams()))
    with pytest.raises(ValueError, match="needs up to 6 KV blocks .* the pool holds 4"):
        s.add(Sequence("x", [1] * 10, SamplingParams(max_tokens=14)))


def test_a_prompt_sharing_a_cached_prefix_computes_only_the_rest_and_counts_the_hit():
    s = make(budget=16)
    s.add(Sequence("first", list(range(10, 20)), SamplingParams(max_tokens=1)))
    assert step(s) == ([("first", 10)], ["first"])  # blocks [10..13], [14..17] now cached
    s.add(Sequence("next", [*range(10, 20), 7, 8], SamplingParams(max_tokens=1)))
    assert step(s) == ([("next", 4)], ["next"])  # 8 of its 12 tokens came from the cache
    assert s.num_prefix_hit_tokens == 8
    # a sequence whose KV came with it (a hand-off) is not a hit
    handed = Sequence("handed", list(range(40, 49)), SamplingParams(max_tokens=1))
    s.kv.allocate(handed, 8)
    handed.num_computed_tokens = 8
    s.add(handed)
    assert step(s) == ([("handed", 1)], ["handed"]) and s.num_prefix_hit_tokens == 8


def test_a_more_urgent_request_is_scheduled_first():
    s = make(budget=8, max_seqs=2)
    for req_id, priority in (("a", 0), ("b", 0), ("urgent", -1)):
        s.add(Sequence(req_id, [10, 11, 12], SamplingParams(max_tokens=8, priority=priority)))
    assert [q.req_id for q in s.waiting] == ["urgent", "a", "b"]
    assert step(s)[0] == [("urgent", 3), ("a", 3)]


def test_when_blocks_run_out_the_least_urgent_is_preempted_not_the_newest():
    s = make(num_blocks=4, budget=16)  # 16 tokens of KV in all
    s.add(Sequence("low", list(range(10, 17)), SamplingParams(max_tokens=8, priority=1)))
    s.add(Sequence("high", list(range(20, 27)), SamplingParams(max_tokens=8)))  # newest
    assert step(s)[0] == [("high", 7), ("low", 7)]
    assert step(s)[0] == [("high", 1), ("low", 1)]  # both now fill their 2 blocks
    assert step(s)[0] == [("high", 1)]  # high needs a third block: low gives back its two
    assert s.num_preemptions == 1 and [q.req_id for q in s.waiting] == ["low"]


def test_a_handed_off_prompt_waits_for_its_kv_then_runs_from_where_the_prefill_stopped():
    s = make(num_blocks=7, budget=8)
    s.add(Sequence("local", [10, 11, 12, 13, 14], SamplingParams(max_tokens=8)))
    step(s)  # "local" runs and holds 2 blocks; 5 are free
    remote = Sequence("remote", list(range(20, 31)), SamplingParams(max_tokens=4))
    s.add_remote(remote)
    assert remote.status == SeqStatus.WAITING_FOR_KV and not s.waiting
    # all the blocks it asks for, and one block of headroom for each running sequence
    assert s.reserve_remote(remote, 16) and remote.block_ids == [2, 3, 4, 5]
    assert s.kv.pool.num_free == 1
    s.kv_landed(remote, 10)  # the final offer covered 10 tokens: the spare block goes back
    assert remote.block_ids == [2, 3, 4] and remote.num_computed_tokens == 10
    assert list(s.waiting) == [remote] and s.kv.pool.num_free == 2
    assert step(s) == ([("local", 1), ("remote", 1)], [])  # no prompt to compute: it decodes


def test_a_reservation_keeps_a_block_of_headroom_per_running_sequence():
    s = make(num_blocks=4, budget=8)
    s.add(Sequence("local", [10, 11, 12], SamplingParams(max_tokens=8)))
    step(s)  # 1 block held, 3 free
    late = Sequence("late", list(range(20, 32)), SamplingParams(max_tokens=2))
    s.add_remote(late)
    assert not s.reserve_remote(late, 12) and late.block_ids == []  # 3 + 1 headroom > 3
    s.drop_remote(late)
    assert not s.waiting_for_kv and late.finish_reason is FinishReason.ABORT
    assert s.kv.pool.num_used == 1


def test_where_every_layer_slides_the_blocks_behind_the_window_go_back_as_it_moves_on():
    """Window 6, blocks of 4: the next query at position p reads p-5..p, so once p reaches
    9 block 0 (0-3) is behind it, at 13 block 1. 40 positions take 10 blocks, more than the
    pool's 6; at most 3 are held at once, and a second sequence runs in the ones given back."""
    s = make(num_blocks=6, budget=8, chunk=8, window=6)
    s.add(Sequence("long", list(range(10, 16)), SamplingParams(max_tokens=34, ignore_eos=True)))
    (seq,) = s.waiting
    held = []
    while s.has_work:
        if seq.num_computed_tokens == 20:  # blocks 0-2 are back: another prompt takes two
            s.add(Sequence("next", list(range(40, 47)), SamplingParams(max_tokens=1)))
        batch = s.schedule()
        held.append(len(seq.block_ids) - seq.num_freed_blocks)  # while the step runs
        s.postprocess(batch, [SampledToken(5) if x.samples else None for x in batch])
        s.kv.pool.check_invariants()
    assert seq.num_tokens == 40 and max(held) == 3
    assert s.kv.pool.num_used == 0  # the rest went back at the end, each block once
    # a prompt is still held whole at first (a hand-off reserves all of it): 24 tokens + 1
    with pytest.raises(ValueError, match="needs up to 7 KV blocks"):
        s.check_fits(24, 16)
