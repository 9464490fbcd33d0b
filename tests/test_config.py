"""The TOML config: defaults, overrides, per-pool knobs, and errors that name the key."""

import os
import subprocess
import sys
import tomllib

import msgspec
import pytest

from baton.config import AUTO_SPLIT_MIN_CPUS, BatonConfig, ConfigError, load_config, to_toml


def baton(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "baton.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_defaults_file_and_flags_layer_in_that_order(tmp_path):
    f = tmp_path / "baton.toml"
    f.write_text('[engine]\ndtype = "float32"\nblock_size = 32\n[decode]\ncount = 3\n')
    config = load_config(f, {"engine.block_size": 8, "engine.max_model_len": None})
    assert config.engine.dtype == "float32"  # from the file
    assert config.engine.block_size == 8  # the flag wins
    assert config.engine.max_model_len is None  # an unset flag leaves the file (default)
    # prefill's default "auto": no prefill pool (aggregated) on a machine under 4 cores
    auto = 0 if len(os.sched_getaffinity(0)) < AUTO_SPLIT_MIN_CPUS else 1
    assert config.decode.count == 3 and config.prefill.count == auto
    assert config.slo.ttft_ms == 2000 and config.slo.tpot_ms == 100
    assert load_config(None, {"prefill.count": 2}).prefill.count == 2  # a number is kept


def test_pool_knobs_override_the_engine_for_that_pool_only():
    config = load_config(None, {"prefill.max_num_batched_tokens": 2048, "decode.max_num_seqs": 8})
    assert config.engine_for("prefill").max_num_batched_tokens == 2048
    assert config.engine_for("prefill").max_num_seqs == 64
    assert config.engine_for("decode").max_num_seqs == 8
    assert config.engine_for("decode").max_num_batched_tokens == 512


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[engine]\nblock_size = 0", r"Expected `int` >= 1 - at `\$.engine.block_size`"),
        ('[engine]\nblock_size = "16"', r"Expected `int`, got `str` - at `\$.engine.block_size`"),
        ('[engine]\ndtype = "fp16"', r"Invalid enum value 'fp16' - at `\$.engine.dtype`"),
        ("[engine]\nblok_size = 16", r"unknown field `blok_size` - at `\$.engine`"),
        ("[slo]\nattainment = 1.5", r"Expected `float` <= 1.0 - at `\$.slo.attainment`"),
        ("[slo]\nttft_ms = -1", r"Expected `float` > 0.0 - at `\$.slo.ttft_ms`"),
        ("[decode]\ncount = -1", r"Expected `int` >= 0 - at `\$.decode.count`"),
        (
            '[gateway]\nadmission = "maybe"',
            r"Invalid enum value 'maybe' - at `\$.gateway.admission`",
        ),
        ("[gateway]\nport = 70000", r"Expected `int` <= 65535 - at `\$.gateway.port`"),
        (
            'transport = "carrier-pigeon"',
            r"Invalid enum value 'carrier-pigeon' - at `\$.transport`",
        ),
        ("[[engine]]\nx = 1", r"Expected `object`, got `array` - at `\$.engine`"),
        ("[engine\n", r"baton.toml: "),  # not TOML at all: the parser's message, with the file
    ],
)
def test_bad_values_are_errors_naming_the_key_and_type(tmp_path, toml, message):
    f = tmp_path / "baton.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(f)


def test_config_show_prints_every_key_with_defaults_and_round_trips(tmp_path):
    f = tmp_path / "baton.toml"
    f.write_text("[slo]\nttft_ms = 500\n[prefill]\nmax_chunk_tokens = 256\n")
    out = baton("config", "show", "--config", str(f), "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    shown = tomllib.loads(out.stdout)
    assert shown["slo"]["ttft_ms"] == 500 and shown["engine"]["dtype"] == "float32"
    assert shown["gateway"]["max_queued_requests"] == 256  # a default, filled in
    assert "# num_blocks = (unset)" in out.stdout  # unset keys are listed, commented
    config = msgspec.convert(shown, BatonConfig)
    assert to_toml(config) == out.stdout
    # every field of every table appears, each with its description
    for section in ("engine", "prefill", "decode", "gateway", "slo"):
        for field in msgspec.structs.fields(getattr(config, section)):
            line = next(x for x in out.stdout.splitlines() if f"{field.name} = " in x)
            assert "  # " in line and len(line.split("  # ")[-1]) > 5, line


def test_a_bad_config_stops_every_command_with_the_key(tmp_path):
    f = tmp_path / "baton.toml"
    f.write_text("[engine]\nmax_num_seqs = 0\n")
    for cmd in (["up"], ["prefill", "--gateway", "tcp://127.0.0.1:1"], ["gateway"]):
        out = baton(*cmd, "--config", str(f))
        assert out.returncode != 0
        assert "bad config" in out.stderr and "$.engine.max_num_seqs" in out.stderr, out.stderr


def test_config_show_never_prints_the_api_key():
    """Reliability review M9: `baton config show` printed the key it was given."""
    out = baton("config", "show", "--api-key", "sk-secret-1")
    assert out.returncode == 0, out.stderr
    assert "sk-secret-1" not in out.stdout and "# api_key = (redacted)" in out.stdout
