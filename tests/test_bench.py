"""`baton bench`: the metric math on hand-made timings, seeded workloads with exact lengths,
and real runs against tiny-model stacks (the CLI, agent sessions, rejected requests)."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from stack import Stack, free_port
from transformers import AutoTokenizer

from baton.bench import llamacpp
from baton.bench.arms import Limits, cpu_spec, resolve
from baton.bench.load import Bench, Load, Run, arrival_times
from baton.bench.metrics import SLO, RequestRecord, buckets, quantiles, stats_ms, summarize
from baton.bench.report import matrix_markdown
from baton.bench.workloads import MATRIX, Dist, WorkloadSpec, build, vocabulary


def record(status="ok", ttft_s=0.1, e2e_s=0.5, output_tokens=5, **kw) -> RequestRecord:
    return RequestRecord(0, 0, 10, output_tokens, status=status, ttft_s=ttft_s, e2e_s=e2e_s,
                         output_tokens=output_tokens, **kw)  # fmt: skip


def test_tpot_is_decode_time_per_token_after_the_first():
    # 5 tokens: the first at 100 ms, the last at 500 ms -> 4 gaps of 100 ms
    assert record().tpot_s == pytest.approx(0.1)
    assert record(output_tokens=1, e2e_s=0.1).tpot_s is None  # no decode step at all
    assert record(status="http 429", ttft_s=None, e2e_s=None).tpot_s is None


def test_percentiles_interpolate_linearly_in_ms():
    s = stats_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s == pytest.approx({"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert stats_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_goodput_keeps_every_miss_in_the_denominator():
    slo = SLO(ttft_ms=250, tpot_ms=62.5, attainment=0.9)
    records = [
        # exactly on both limits (binary fractions, so no rounding): they meet the SLO
        *(record(ttft_s=0.25, e2e_s=0.5, itl_s=[0.0625] * 4) for _ in range(6)),
        record(ttft_s=0.5, e2e_s=0.75),  # TTFT 500 ms
        record(ttft_s=0.25, e2e_s=0.75),  # TPOT 125 ms
        record(output_tokens=1, ttft_s=0.25, e2e_s=0.25),  # one token: no TPOT to miss
        record(status="http 429", ttft_s=None, e2e_s=None, output_tokens=0),
        record(status="aborted", ttft_s=0.25, e2e_s=0.3, output_tokens=3),
        record(status="error", ttft_s=None, e2e_s=None, output_tokens=0),
    ]
    s = summarize(records, duration_s=2.0, slo=slo)
    assert s["num_requests"] == 12 and s["num_ok"] == 9
    assert s["statuses"] == {"ok": 9, "http 429": 1, "aborted": 1, "error": 1}
    assert s["goodput"] == 7 / 2.0
    assert s["slo_attainment"] == 7 / 12 and not s["meets_attainment"]
    assert s["request_throughput"] == 9 / 2.0
    assert s["output_throughput"] == (8 * 5 + 1) / 2.0  # the aborted one's 3 tokens do not count
    assert s["itl_ms"]["p50"] == 62.5
    assert s["tpot_ms"]["mean"] == (7 * 62.5 + 125) / 8  # ok answers of 2+ tokens only
    assert summarize(records, 2.0, SLO(250, 62.5, attainment=0.5))["meets_attainment"]


def test_the_matrix_table_gives_each_systems_goodput_and_429s_per_workload_and_rate():
    slo = SLO(ttft_ms=250, tpot_ms=62.5, attainment=0.9)

    def run(system: str, workload: str, rate: float, good: int, refused: int) -> Run:
        records = [record(ttft_s=0.25, e2e_s=0.5)] * good + [record(ttft_s=1.0)] * (4 - good)
        records += [record(status="http 429", ttft_s=None, e2e_s=None)] * refused
        summary = summarize(records, 2.0, slo)
        return Run(system, Load(rate), 0, records, 2.0, None, summary, workload)

    runs = [
        run("peer", "short", 2, good=4, refused=0),
        run("peer", "long-prompt", 0.5, good=2, refused=0),
        run("baton", "short", 2, good=3, refused=1),
        run("baton", "long-prompt", 0.5, good=4, refused=0),
    ]
    assert matrix_markdown(runs, "peer").splitlines() == [
        "| workload | load | peer goodput (429s) | baton goodput (429s) |",
        "|---|---|---|---|",
        "| short | 2 req/s | 2.00 (0) | 1.50 0.75x (1) |",
        "| long-prompt | 0.5 req/s | 1.00 (0) | 2.00 2.00x (0) |",
    ]
    # the named workloads cover what the split must serve, each from light load up
    assert set(MATRIX) == {"short", "mixed", "long-prompt", "long-output", "chat"}
    assert all(list(rates) == sorted(rates) and len(rates) >= 3 for _, rates in MATRIX.values())


def test_prediction_error_quantiles_come_from_the_histograms_difference():
    text = "\n".join([
        "# HELP baton_ttft_prediction_error real TTFT / predicted",
        'baton_ttft_prediction_error_bucket{le="0.5"} 2.0',
        'baton_ttft_prediction_error_bucket{le="1.0"} 12.0',
        'baton_ttft_prediction_error_bucket{le="2.0"} 20.0',
        'baton_ttft_prediction_error_bucket{le="+Inf"} 22.0',
        "baton_ttft_prediction_error_count 22.0",
    ])  # fmt: skip
    after = buckets(text, "baton_ttft_prediction_error")
    assert after == {0.5: 2, 1.0: 12, 2.0: 20, float("inf"): 22}
    before = {0.5: 2, 1.0: 2, 2.0: 2, float("inf"): 2}  # an earlier run's two requests
    q = quantiles(before, after)  # this run: 10 in (0.5, 1], 8 in (1, 2], 2 beyond
    assert q == {"count": 20, "p50": pytest.approx(1.0), "p90": pytest.approx(1.0 + 8 / 8)}
    assert quantiles(after, after) is None and quantiles({}, {}) is None
    assert buckets("vllm:num_requests_running 0", "baton_ttft_prediction_error") == {}


@pytest.fixture(scope="module")
def tokenizer(tiny_text_model):
    return AutoTokenizer.from_pretrained(tiny_text_model)


@pytest.fixture(scope="module")
def vocab(tokenizer) -> np.ndarray:
    return vocabulary(tokenizer)


@pytest.mark.parametrize("name", ["random", "shared-prefix", "mixed", "agent", "tools"])
def test_workloads_are_reproducible_from_their_seed(vocab, name):
    spec = WorkloadSpec(name=name, num_requests=12, input_len=Dist.parse("uniform:5:50"),
                        prefix_len=30, long_len=Dist.parse("200"), tool_len=Dist.parse("7"))  # fmt: skip
    assert build(spec, vocab, seed=1) == build(spec, vocab, seed=1)
    assert build(spec, vocab, seed=1) != build(spec, vocab, seed=2)


def test_workload_lengths_are_exact(vocab, tokenizer):
    fixed = WorkloadSpec(num_requests=20, input_len=Dist.parse("33"), output_len=Dist.parse("5"))
    turns = [s.turns[0] for s in build(fixed, vocab, seed=0)]
    assert [(len(t.new_ids), t.max_tokens) for t in turns] == [(33, 5)] * 20
    special = set(tokenizer.all_special_ids)
    assert not special & {i for t in turns for i in t.new_ids}

    spec = WorkloadSpec(name="shared-prefix", num_requests=8, prefix_len=40,
                        input_len=Dist.parse("uniform:10:20"))  # fmt: skip
    prompts = [s.turns[0].new_ids for s in build(spec, vocab, seed=0)]
    assert all(p[:40] == prompts[0][:40] and 50 <= len(p) <= 60 for p in prompts)

    spec = WorkloadSpec(name="mixed", num_requests=20, long_fraction=0.1, input_len=Dist.parse("16"),
                        long_len=Dist.parse("uniform:2048:4096"), long_output_len=Dist.parse("9"))  # fmt: skip
    shapes = [(len(s.turns[0].new_ids), s.turns[0].max_tokens) for s in build(spec, vocab, 0)]
    long = [(n, out) for n, out in shapes if n > 16]
    assert len(long) == 2 and all(2048 <= n <= 4096 and out == 9 for n, out in long)

    spec = WorkloadSpec(name="agent", num_requests=9, turns=3, input_len=Dist.parse("100"),
                        tool_len=Dist.parse("12"), think_s=Dist.parse("exp:2"))  # fmt: skip
    sessions = build(spec, vocab, seed=0)
    assert len(sessions) == 3
    for s in sessions:
        assert [len(t.new_ids) for t in s.turns] == [100, 12, 12]
        assert s.turns[0].think_s == 0 and all(t.think_s >= 0 for t in s.turns[1:])


def test_bad_distribution_names_the_forms():
    with pytest.raises(ValueError, match="uniform:LO:HI"):
        Dist.parse("uniform:5")


def test_arrivals_are_poisson_or_gamma_bursts_at_the_rate():
    assert arrival_times(Load(), 4, np.random.default_rng(0)).tolist() == [0, 0, 0, 0]
    for burstiness in (1.0, 0.25):
        gaps = np.diff(
            arrival_times(Load(rate=4, burstiness=burstiness), 40_000, np.random.default_rng(0))
        )
        assert gaps.mean() == pytest.approx(0.25, rel=0.03)
        # a gamma with shape k has a squared coefficient of variation of 1 / k
        assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.1)


def test_builtin_arms_share_model_dtype_limits_and_cores(tmp_path):
    limits = Limits("/m", "bfloat16", [0, 1, 2, 3], 64, 512, 2, max_model_len=None)
    script = tmp_path / "vllm-cpu.sh"
    script.touch()
    disagg, agg, vllm = resolve(["baton-disagg", "baton-agg", "vllm-cpu"], limits, 9000,
                                tmp_path, script)  # fmt: skip
    argv = disagg.start[5:]  # after `python -P -m baton.cli up`: flag, value, flag, value, ...
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    assert flags["--prefill-cpus"] == "0-1" and flags["--decode-cpus"] == "2-3"
    assert (flags["--model"], flags["--dtype"], flags["--max-num-seqs"]) == ("/m", "bfloat16", "64")
    assert disagg.url == "http://127.0.0.1:9000" and vllm.url == "http://127.0.0.1:9002"
    assert vllm.env["OMP_BIND"] == "0-3" and vllm.env["MODEL_DIR"] == "/m"
    assert vllm.env["EXTRA_ARGS"] == "--max-num-seqs 64 --max-num-batched-tokens 512"
    assert vllm.stop[-2:] == ["stop", "9002"]
    argv = agg.start[5:]
    flags = dict(zip(argv[::2], argv[1::2], strict=True))  # one decode on every core
    assert (flags["--prefill"], flags["--decode"], flags["--decode-cpus"]) == ("0", "1", "0-3")
    (int8,) = resolve(["baton-disagg-int8"], limits, 9000, tmp_path, script)
    assert (
        int8.start[-2:] == ["--quantization", "int8"] and len(int8.start) == len(disagg.start) + 2
    )
    missing = resolve(["vllm-cpu"], limits, 9000, tmp_path, tmp_path / "none.sh")
    assert "not found" in missing[0].unavailable
    assert cpu_spec([5, 0, 1, 2]) == "0-2,5"


def test_llama_cpp_arms_get_the_same_cores_slots_and_kv_bytes(tmp_path, monkeypatch):
    """The argv only: building llama.cpp (minutes) is `baton bench compare`'s first run's job."""
    model = tmp_path / "m"
    model.mkdir()
    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "hidden_size": 576}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(llamacpp, "build", lambda base, log: tmp_path / "bin")
    converted = []
    monkeypatch.setattr(
        llamacpp, "convert",
        lambda base, m, dtype, q8, bin_dir, log: converted.append((dtype, q8)) or tmp_path / "m.gguf",
    )  # fmt: skip
    monkeypatch.setenv("ANCHORS", str(tmp_path))
    limits = Limits(str(model), "bfloat16", [0, 1, 2, 3], 64, 512, 2, max_model_len=None)
    bf16, q8 = resolve(["llama-cpp", "llama-cpp-q8"], limits, 9000, tmp_path, tmp_path / "x.sh")
    assert converted == [("bfloat16", False), ("bfloat16", True)]
    assert bf16.start[:3] == ["taskset", "-c", "0-3"] and q8.url == "http://127.0.0.1:9001"
    assert bf16.start[-2:] == ["-kvu", "--no-webui"]  # one KV cache for all the slots
    flags = dict(zip(bf16.start[4:-2:2], bf16.start[5:-2:2], strict=True))
    assert (flags["-t"], flags["-tb"], flags["-np"], flags["-ub"]) == ("4", "4", "64", "512")
    # 2 GiB of bf16 KV: 2 x 30 layers x 3 heads x 64 dims x 2 bytes = 23,040 bytes a token
    assert (flags["-c"], flags["-ctk"], flags["-ctv"]) == (str((2 << 30) // 23_040), "bf16", "bf16")

    def fails(base, log):
        raise subprocess.CalledProcessError(2, ["cmake"])

    # a GGUF is served as it is, at its own precision (no second quantization)
    monkeypatch.setattr(llamacpp, "resolve_model_dir", lambda gguf: model)
    limits = replace(limits, model=str(tmp_path / "m.q8_0.gguf"))
    given, requant = resolve(["llama-cpp", "llama-cpp-q8"], limits, 9000, tmp_path, tmp_path)
    assert given.start[given.start.index("-m") + 1] == limits.model and len(converted) == 2
    assert "serves it as it is" in requant.unavailable

    monkeypatch.setattr(llamacpp, "build", fails)
    (broken,) = resolve(["llama-cpp"], limits, 9000, tmp_path, tmp_path / "x.sh")
    assert "could not prepare it" in broken.unavailable and "prepare.log" in broken.unavailable


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model):
    s = Stack(
        tmp_path_factory.mktemp("bench") / "logs", tiny_text_model,
        "--chat-template", "hermes", "--tool-call-parser", "hermes",  # the tools workload's
    )  # fmt: skip
    yield s
    s.stop()


def run_measure(stack, tokenizer, vocab, spec, load, max_duration_s=None):
    bench = Bench(spec, [load], SLO(), 0, tokenizer, vocab, max_duration_s, warmup=0)
    (run,) = bench.sweep(stack.url, "tiny")
    return run


def test_agent_turns_send_the_last_answer_and_a_tool_result(stack, tokenizer, vocab):
    spec = WorkloadSpec(name="agent", num_requests=6, turns=3, input_len=Dist.parse("20"),
                        output_len=Dist.parse("4"), tool_len=Dist.parse("uniform:3:9"),
                        think_s=Dist.parse("exp:0.05"))  # fmt: skip
    run = run_measure(stack, tokenizer, vocab, spec, Load(concurrency=2))
    sessions = build(spec, vocab, seed=0)
    assert [r.status for r in run.records] == ["ok"] * 6
    for r in run.records:
        turns = sessions[r.session].turns[: r.turn + 1]
        # each earlier turn: its new ids + its 4-token answer
        assert r.prompt_tokens == sum(len(t.new_ids) for t in turns) + 4 * r.turn
        assert r.output_tokens == 4 and len(r.itl_s) == 3


def test_tools_turns_make_a_call_whose_tokens_are_timed(stack, tokenizer, vocab):
    spec = WorkloadSpec(name="tools", num_requests=4, input_len=Dist.parse("20"),
                        output_len=Dist.parse("300"))  # fmt: skip
    run = run_measure(stack, tokenizer, vocab, spec, Load(concurrency=2))
    assert [r.status for r in run.records] == ["ok"] * 4
    for r in run.records:  # the call ended it (the grammar), not the cap
        assert 10 < r.output_tokens < 300 and len(r.itl_s) == r.output_tokens - 1


def test_rejected_and_aborted_requests_are_misses_not_dropped(stack, tokenizer, vocab):
    # the tiny model's context is 1024: the long prompts get a 400 from the gateway
    spec = WorkloadSpec(name="mixed", num_requests=6, long_fraction=0.5, input_len=Dist.parse("8"),
                        output_len=Dist.parse("4"), long_len=Dist.parse("1500"))  # fmt: skip
    run = run_measure(stack, tokenizer, vocab, spec, Load())
    assert run.summary["statuses"] == {"ok": 3, "http 400": 3}
    assert run.summary["slo_attainment"] == 0.5

    # 400-token answers cannot finish in 0.3 s: every request is in flight at the bound
    spec = WorkloadSpec(num_requests=4, input_len=Dist.parse("8"), output_len=Dist.parse("400"))
    run = run_measure(stack, tokenizer, vocab, spec, Load(), max_duration_s=0.3)
    assert run.summary["statuses"] == {"aborted": 4} and run.summary["goodput"] == 0
    assert 0.3 <= run.duration_s < 5  # ended at the bound, not when 400 tokens were done


def test_bench_compare_measures_each_arm_and_writes_requests_and_plots(
    tmp_path, stack, tiny_text_model
):
    """`baton bench compare` starts Baton aggregated itself, measures the running fixture
    stack (disaggregated) by URL too, and reports the arms it cannot run."""
    out = tmp_path / "out"
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    cmd = [
        sys.executable, "-P", "-m", "baton.cli", "bench", "compare",
        "--arms", "baton-agg", f"fixture={stack.url}", "vllm-cpu",
        "--vllm-script", str(tmp_path / "missing.sh"), "--baseline", "fixture",
        "--model", str(tiny_text_model), "--dtype", "float32", "--cpus", cpus,
        "--kv-cache-gib", "1", "--port", str(free_port()),
        "--num-requests", "8", "--input-len", "uniform:8:40", "--output-len", "6",
        "--rate", "20", "inf", "--warmup", "1", "--out-dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    runs = {(r["system"], r["load"]["label"]): r for r in result["runs"]}
    assert set(runs) == {(s, load) for s in ("baton-agg", "fixture")
                         for load in ("20 req/s", "all at once")}  # fmt: skip
    for run in runs.values():
        assert [(q["session"], q["status"], q["output_tokens"]) for q in run["requests"]] == [
            (i, "ok", 6) for i in range(8)
        ]
        assert all(8 <= q["prompt_tokens"] <= 40 for q in run["requests"])
    # the same seed per load: both systems got the same prompts
    lengths = {s: [q["prompt_tokens"] for q in runs[s, "20 req/s"]["requests"]] for s in ("baton-agg", "fixture")}  # fmt: skip
    assert lengths["baton-agg"] == lengths["fixture"]
    assert set(result["unavailable"]) == {"vllm-cpu"}
    assert "| baton-agg | 20 req/s | 8 / 8 |" in done.stdout and "x) |" in done.stdout
    assert all((out / p).stat().st_size > 10_000 for p in ("latency_vs_load.png", "cdf.png"))
    started = json.loads((out / "logs" / "baton-agg" / "stack.json").read_text())
    assert not [s["pid"] for s in started.values() if os.path.exists(f"/proc/{s['pid']}")]
