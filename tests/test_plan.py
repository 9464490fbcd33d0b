"""`baton plan`: the simulator on hand-made profiles (timings checkable by hand, and
deployments whose best split is known), the config it writes, the validation report, and a
smoke test of profiling a real (tiny) engine."""

import dataclasses
import math

import numpy as np
import pytest

from baton.bench.load import Load, Run, arrival_times
from baton.bench.metrics import SLO, RequestRecord, summarize
from baton.bench.report import write_json
from baton.bench.workloads import Dist
from baton.cli import main
from baton.config import EngineConfig, load_config, to_toml
from baton.plan import search, validate
from baton.plan.measure import measure
from baton.plan.profile import Profile, attention_pairs
from baton.plan.simulate import Arrival, Deployment, poisson_arrivals, simulate


def profile(**costs: float) -> Profile:
    """Every cost zero unless given."""
    zero = dict.fromkeys(
        ["prefill_fixed_s", "prefill_per_token_s", "prefill_per_pair_s", "decode_fixed_s",
         "decode_per_seq_s", "decode_per_ctx_token_s", "handoff_fixed_s", "handoff_per_token_s"],
        0.0,
    )  # fmt: skip
    return Profile(model="synthetic", dtype="bfloat16", threads=1, **{**zero, **costs})


# prefill: 10 ms + 1 ms/token; decode: 20 ms + 1 ms/seq; hand-off: 5 ms
SIMPLE = profile(
    prefill_fixed_s=0.010,
    prefill_per_token_s=0.001,
    decode_fixed_s=0.020,
    decode_per_seq_s=0.001,
    handoff_fixed_s=0.005,
)


def deployment(num_prefill: int = 1, num_decode: int = 1, **knobs) -> Deployment:
    """No admission, no TPOT cap and no chunk cap unless given: nothing but the steps."""
    return Deployment(num_prefill, num_decode, **{"prefill_budget": 512, "decode_budget": 512,
                                                  "prefill_chunk": 512, "decode_chunk": 512,
                                                  "decode_max_batch": 8, **knobs})  # fmt: skip


def test_one_request_ttft_is_its_prefill_and_tpot_includes_the_handoff():
    (rec,) = simulate(SIMPLE, deployment(), [Arrival(0.0, 100, 3)]).records
    assert rec.ttft_s == pytest.approx(0.010 + 0.100)
    # token 0 at 0.110; hand-off 5 ms; two decode steps of 20 + 1 ms
    assert rec.e2e_s == pytest.approx(0.110 + 0.005 + 2 * 0.021)
    assert rec.tpot_s == pytest.approx((0.005 + 2 * 0.021) / 2)


def test_aggregated_prefills_on_the_decode_with_no_handoff():
    (rec,) = simulate(SIMPLE, deployment(0, 1), [Arrival(0.0, 100, 3)]).records
    assert rec.ttft_s == pytest.approx(0.110)  # the same step, on the decode
    assert rec.tpot_s == pytest.approx(0.021)


def test_prefill_chunks_prompts_fifo_under_the_token_budget():
    # two 300-token prompts at once, 512 tokens a step: step 1 = all of A + 212 of B,
    # step 2 = B's last 88
    out = simulate(SIMPLE, deployment(), [Arrival(0.0, 300, 1), Arrival(0.0, 300, 1)])
    a, b = out.records
    assert a.ttft_s == pytest.approx(0.010 + 0.512)
    assert b.ttft_s == pytest.approx(0.522 + 0.010 + 0.088)
    assert out.duration_s == pytest.approx(b.ttft_s)


def test_a_long_prompt_takes_a_chunk_a_step_while_a_short_one_waits():
    # the default chunk is half the budget: 256 of the long prompt and all of the short one
    arrivals = [Arrival(0.0, 1000, 1), Arrival(0.0, 100, 1)]
    long, short = simulate(SIMPLE, deployment(prefill_chunk=None), arrivals).records
    assert short.ttft_s == pytest.approx(0.010 + 0.356)
    # alone again, the long one takes the whole budget: 744 left = 512 + 232
    assert long.ttft_s == pytest.approx(0.366 + 0.522 + 0.242)


def test_attention_pairs_of_a_chunk_continue_from_its_cached_tokens():
    assert attention_pairs(0, 4) == 1 + 2 + 3 + 4
    assert attention_pairs(4, 2) == 5 + 6
    costly = profile(prefill_per_pair_s=0.001)
    chunked = simulate(costly, deployment(prefill_budget=4), [Arrival(0.0, 6, 1)]).records[0]
    assert chunked.ttft_s == pytest.approx(0.021)  # the pairs of one 6-token step: 21


def test_goodput_and_attainment_count_requests_meeting_both_targets():
    out = simulate(SIMPLE, deployment(), [Arrival(0.0, 300, 1), Arrival(0.0, 300, 1)])
    s = out.summary(SLO(ttft_ms=600, tpot_ms=100, attainment=0.9))  # TTFTs 522 and 620 ms
    assert s["slo_attainment"] == 0.5 and not s["meets_attainment"]
    assert s["goodput"] == pytest.approx(1 / 0.620)
    assert s["ttft_ms"]["p90"] == pytest.approx(522 + 0.9 * (620 - 522))


def test_slo_admission_refuses_a_prompt_whose_predicted_ttft_misses():
    # 100-token steps of 110 ms. At 0.25 s the prefill has fitted two of them (a fit needs
    # two) and the first prompt has 100 tokens left (its third step running): 100 + 300
    # tokens at 1.1 ms each is 440 ms > the 400 ms target.
    d = deployment(prefill_budget=100, admission_ttft_s=0.4)
    out = simulate(SIMPLE, d, [Arrival(0.0, 300, 1), Arrival(0.25, 300, 1)])
    assert [r.status for r in out.records] == ["ok", "http 429"]
    full = deployment(max_inflight=1)  # and the in-flight limit, with no admission
    out = simulate(SIMPLE, full, [Arrival(0.0, 300, 1), Arrival(0.1, 30, 1)])
    assert [r.status for r in out.records] == ["ok", "http 429"]


def test_a_busy_prefill_lends_a_prompt_to_the_decode_that_would_finish_it_sooner():
    # a 2000-token prompt holds the prefill for 4 steps (512 tokens: 0.522 s each); at 1.2 s
    # it has fitted two, and 976 tokens are left: a 50-token prompt would wait ~1 s there.
    # The idle decode, not measured yet, is taken at half the prefill's speed: ~0.1 s.
    arrivals = [Arrival(0.0, 2000, 1), Arrival(1.2, 50, 1)]
    queued = simulate(SIMPLE, deployment(), arrivals).records[1]
    assert queued.ttft_s > 0.3
    stolen = simulate(SIMPLE, deployment(busy_prefill_tokens=64), arrivals).records[1]
    assert stolen.ttft_s == pytest.approx(0.010 + 0.050)  # one 50-token step, on the decode
    idle = simulate(SIMPLE, deployment(busy_prefill_tokens=64), [Arrival(0.0, 50, 2)])
    assert idle.records[0].ttft_s == pytest.approx(0.060)  # an idle prefill keeps its work


def test_prompts_on_a_decode_are_paced_to_its_tpot_target():
    # aggregated: a 1000-token prompt arrives while a 6-token answer decodes. Its chunks
    # beside that decode are paid for by the credit the decode steps bank (baton.slo)
    arrivals = [Arrival(0.0, 10, 6), Arrival(0.05, 1000, 1)]
    capped = simulate(SIMPLE, deployment(0, 1, tpot_s=0.1), arrivals).records
    free = simulate(SIMPLE, deployment(0, 1), arrivals).records
    assert free[0].tpot_s > 0.1 > capped[0].tpot_s  # one 512-token step alone breaks it
    assert capped[1].ttft_s > free[1].ttft_s  # paid for in the long prompt's TTFT


def test_arrivals_are_the_send_times_baton_bench_draws():
    ours = poisson_arrivals(2.0, Dist.parse("512"), Dist.parse("uniform:8:16"), 50, seed=3)
    bench = arrival_times(Load(rate=2.0), 50, np.random.default_rng(3))
    assert [a.at_s for a in ours] == pytest.approx(bench.tolist())
    assert {a.prompt_tokens for a in ours} == {512}
    assert all(8 <= a.output_tokens <= 16 for a in ours)


def best_split(
    costs: Profile, rate: float, prompt: int, output: int, slo: SLO, aggregated: bool = True
) -> str:
    """The best of 4 workers' splits (0:4 only if `aggregated`) on 200 Poisson arrivals."""
    arrivals = poisson_arrivals(rate, Dist.parse(str(prompt)), Dist.parse(str(output)), 200, 0)
    base = deployment(tpot_s=slo.tpot_ms / 1e3, admission_ttft_s=0.85 * slo.ttft_ms / 1e3)
    candidates = search.candidates(base, 4, (256, 512), (8, 16))
    candidates = [d for d in candidates if aggregated or d.num_prefill]
    return search.search(costs, arrivals, slo, candidates)[0].deployment.split


def test_expensive_prefill_gives_prefill_the_most_workers():
    # a 500-token prompt takes 0.8 s: 3 req/s keep 3 prefills 80% busy, 2 would drown;
    # decode is nearly free; prefilling on the decodes would stall them past TPOT
    costs = profile(prefill_per_token_s=0.0016, decode_fixed_s=0.005, decode_per_seq_s=0.0005)
    assert best_split(costs, 3.0, 500, 32, SLO(3000, 50, 0.9)) == "3:1"


def test_expensive_decode_gives_decode_the_most_workers():
    # a decode step is 10 ms + 10 ms/seq, so the 100 ms TPOT caps a batch at 9: ~1.4 req/s
    # of 64 tokens per decode; 3.5 req/s need 3 of them. Prefill is cheap (60 ms a prompt):
    # 4 decodes that prefill locally beat 1 prefill + 3 decodes, which beat the rest.
    costs = profile(
        prefill_fixed_s=0.01, prefill_per_token_s=0.0001, decode_fixed_s=0.01, decode_per_seq_s=0.01
    )
    slo = SLO(2000, 100, 0.9)
    assert best_split(costs, 3.5, 500, 64, slo) == "0:4"
    assert best_split(costs, 3.5, 500, 64, slo, aggregated=False) == "1:3"


def test_the_written_config_parses_back_with_the_chosen_pools(tmp_path):
    base = load_config(overrides={"slo.tpot_ms": 80.0})
    for (num_prefill, num_decode), knobs, cpus in (
        ((1, 3), {"prefill_budget": 1024, "decode_max_batch": 16}, ("0", "1-3")),
        ((0, 2), {"decode_budget": 256, "decode_max_batch": 32}, (None, "0-3")),
    ):
        chosen = dataclasses.replace(
            Deployment.from_config(base), num_prefill=num_prefill, num_decode=num_decode, **knobs
        )
        path = tmp_path / "plan.toml"
        path.write_text(to_toml(search.to_config(base, chosen, num_cores=4)))
        config = load_config(path)
        assert Deployment.from_config(config) == chosen
        assert (config.prefill.cpus, config.decode.cpus) == cpus
        assert config.engine.threads == 4 // (num_prefill + num_decode)
        assert config.slo.tpot_ms == 80.0  # the rest of the base config is kept


def test_validation_reports_relative_errors_against_a_bench_run(tmp_path):
    # measured: TTFT 100 ms, TPOT 25 ms over a 0.2 s run; predicted (SIMPLE): TTFT 110 ms,
    # TPOT 23.5 ms, the run ending at 0.157 s
    rec = RequestRecord(0, 0, prompt_tokens=100, max_tokens=3, status="ok", ttft_s=0.1,
                        e2e_s=0.15, output_tokens=3)  # fmt: skip
    slo = SLO(ttft_ms=200, tpot_ms=50)
    run = Run("baton", Load(rate=1.0), 0, [rec], 0.2, None, summarize([rec], 0.2, slo))
    write_json(tmp_path / "results.json", [run], {"slo": vars(slo)})
    (c,) = validate.compare(tmp_path / "results.json", SIMPLE, deployment())
    assert c.run == "baton, 1 req/s"
    assert c.rows["TTFT p90 ms"] == pytest.approx((110, 100, 0.10))
    assert c.rows["TPOT p90 ms"] == pytest.approx((23.5, 25, -0.06))
    assert c.rows["goodput req/s"] == pytest.approx((1 / 0.157, 5, (1 / 0.157 - 5) / 5))
    assert c.rows["SLO attainment"] == (1.0, 1.0, 0.0)
    assert "| TTFT p90 ms | 110.00 | 100.00 | +10% |" in validate.report([c])


def test_profile_fit_recovers_the_planes_and_round_trips_as_json(tmp_path):
    prefill = [(n, 0.02 + 0.001 * n + 1e-6 * attention_pairs(0, n)) for n in (32, 128, 512)]
    decode = [(b, b * c, 0.03 + 0.002 * b + 1e-5 * b * c) for b in (1, 8) for c in (128, 1024)]
    p = Profile.fit(prefill_samples=prefill, decode_samples=decode, model="m", dtype="float32",
                    threads=1, handoff_fixed_s=0.002, handoff_per_token_s=1e-6)  # fmt: skip
    fitted = (p.prefill_fixed_s, p.prefill_per_token_s, p.prefill_per_pair_s)
    assert fitted == pytest.approx((0.02, 0.001, 1e-6))
    fitted = (p.decode_fixed_s, p.decode_per_seq_s, p.decode_per_ctx_token_s)
    assert fitted == pytest.approx((0.03, 0.002, 1e-5))
    p.save(tmp_path / "profile.json")
    assert Profile.load(tmp_path / "profile.json") == p


def test_plan_command_prints_the_ranked_table_and_writes_the_best(tmp_path, capsys):
    SIMPLE.save(tmp_path / "profile.json")
    out = tmp_path / "plan.toml"
    main(["plan", "--profile", str(tmp_path / "profile.json"), "--workers", "2",
          "--cores", "2", "--rate", "1", "--input-len", "uniform:64:256", "--output-len", "16",
          "--num-requests", "30", "--budgets", "256", "--batches", "8", "16", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| split P:D | token budget | max batch | TTFT p90 ms |" in printed
    assert "| 1:1 | 256 |" in printed and "| 0:2 (aggregated) | 256 |" in printed
    best = printed.split("best: ")[1].split(",")[0]
    config = load_config(out)
    assert f"{config.prefill.count}:{config.decode.count}" == best


def test_profiling_a_real_engine_gives_positive_costs(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), dtype="float32", block_size=4, num_blocks=256)
    p = measure(config, threads=1, prefill_tokens=(8, 32, 64), decode_batches=(1, 4),
                decode_contexts=(8, 32), log=lambda _: None)  # fmt: skip
    assert len(p.prefill_samples) == 6 and len(p.decode_samples) == 4 * 4
    assert all(s > 0 for *_, s in p.prefill_samples + p.decode_samples)
    assert p.step_s(64, attention_pairs(0, 64)) > 0 and p.step_s(0, 0, 4, 128) > 0
    assert p.handoff_per_token_s > 0 and math.isfinite(p.handoff_per_token_s)
