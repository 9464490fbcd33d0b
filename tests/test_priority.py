"""Request priority through a real prefill service (the test plays its gateway and decode):
of the prompts queued together, the most urgent is prefilled first."""

import time

from prefill_harness import PrefillHarness

from baton import protocol as P
from baton.config import EngineConfig
from baton.engine import Engine
from baton.sampling_params import SamplingParams


def test_of_prompts_queued_together_the_most_urgent_gets_its_first_token_first(tiny_text_model):
    config = EngineConfig(model=str(tiny_text_model), dtype="float32", num_blocks=64,
                          max_num_batched_tokens=32)  # fmt: skip
    h = PrefillHarness(Engine.build(config), "prefill-priority")
    try:
        for i, priority in enumerate([0, 0, 0, -5]):
            prompt = [(31 * i + 7 * j) % 500 + 3 for j in range(64)]
            params = SamplingParams(max_tokens=2, priority=priority)
            h.request(f"r{i}", token_ids=prompt, params=params)
        deadline = time.monotonic() + 10
        while len(h.service.sched.waiting) < 4:  # all four queued before the first step
            assert time.monotonic() < deadline, "the requests never arrived"
            h.service.drain()
        order = [h.wait(P.TokenOutput).req_id for _ in range(4)]
        assert order[0] == "r3"  # sent last, served first
        assert order[1:] == ["r0", "r1", "r2"]  # the rest first come first served
    finally:
        h.close()
