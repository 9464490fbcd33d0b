"""llama.cpp's `llama-server` as arms of `baton bench compare`: `llama-cpp` serves the model's
weights at the run's dtype (bf16 or f32), `llama-cpp-q8` quantized to Q8_0. A `--model` that is
a GGUF is served as it is (a Q8_0 one then holds the very int8 blocks Baton's `-int8` arms
multiply).

Made once into $ANCHORS/llama.cpp (default ~/.cache/baton-anchors, beside the vLLM anchor): the
llama.cpp that PyPI's llama-cpp-python sdist vendors, compiled for this CPU (GGML_NATIVE, so one
build per set of CPU flags); the model converted by llama.cpp's own converter and quantized by
its llama-quantize. Served as its docs say for CPUs: threads = the physical cores it runs on
(-t and -tb), pinned to them; parallel slots, continuous batching, one unified KV cache of the
size the other arms get, in the run's dtype. Each step's command goes to `prepare.log` there.
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from baton.kernels.native import cpu_flags
from baton.model.files import resolve_model_dir

if TYPE_CHECKING:
    from baton.bench.arms import Limits

SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp (its build 0.5.0-dev)
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no network at build time
]  # fmt: skip
TYPES = {"bfloat16": ("bf16", 2), "float32": ("f32", 4)}  # GGUF and KV type, bytes a value


def root() -> Path:
    anchors = Path(os.environ.get("ANCHORS", Path.home() / ".cache" / "baton-anchors"))
    return anchors / "llama.cpp"


def cpu_key() -> str:
    """Which build this CPU takes: a hash of its feature flags."""
    return hashlib.sha256(cpu_flags().encode()).hexdigest()[:12]


def run(argv: list, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(map(str, argv))}\n")
        out.flush()
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True)


def source(base: Path, log: Path) -> Path:
    """llama.cpp's tree, from the sdist."""
    src = base / f"src-{SDIST.split('==')[1]}"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        # the sdist only (":all:" would also build its build backend from source)
        run([*pip, "--no-binary", SDIST.split("==")[0], SDIST, "-d", tmp], log)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            top = tar.getmembers()[0].name.split("/")[0]
            prefix = f"{top}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(Path(tmp) / "llama.cpp", members=members, filter="data")
        (Path(tmp) / "llama.cpp").rename(src)
    return src


def build(base: Path, log: Path) -> Path:
    """The directory of llama-server and llama-quantize for this CPU, built if missing."""
    out = base / f"build-{cpu_key()}"
    bin_dir = out / "bin"
    if (bin_dir / "llama-server").is_file() and (bin_dir / "llama-quantize").is_file():
        return bin_dir
    src = source(base, log)
    run(["cmake", "-S", src, "-B", out, *CMAKE_FLAGS], log)
    jobs = str(len(os.sched_getaffinity(0)))
    run(["cmake", "--build", out, "-j", jobs, "--target", "llama-server", "llama-quantize"], log)
    return bin_dir


def convert(base: Path, model: Path, dtype: str, q8: bool, bin_dir: Path, log: Path) -> Path:
    """The model as a GGUF: converted at `dtype` by llama.cpp's converter, then (q8)
    quantized to Q8_0 from that. Cached by the model directory's path and files."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.iterdir())
    key = hashlib.sha256(json.dumps([str(model.resolve()), files]).encode()).hexdigest()[:12]
    outtype = TYPES[dtype][0]
    full = base / f"{model.name}-{key}-{outtype}.gguf"
    if not full.is_file():
        src = source(base, log)
        tmp = full.with_suffix(".tmp")
        run([sys.executable, src / "convert_hf_to_gguf.py", model, "--outtype", outtype,
             "--outfile", tmp], log)  # fmt: skip
        tmp.rename(full)
    if not q8:
        return full
    quantized = base / f"{model.name}-{key}-q8_0.gguf"
    if not quantized.is_file():
        tmp = quantized.with_suffix(".tmp")
        run([bin_dir / "llama-quantize", full, tmp, "Q8_0"], log)
        tmp.rename(quantized)
    return quantized


def kv_tokens(model: Path, dtype: str, gib: int) -> int:
    """Tokens a KV cache of `gib` holds for `model` at `dtype`."""
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim
    return (gib << 30) // (per_token * TYPES[dtype][1])


class Unprepared(RuntimeError):
    pass


def serve_argv(limits: "Limits", port: int, q8: bool, cpus: str) -> list[str]:
    """Builds and converts what is missing (minutes, once); the command that serves it on
    the cores `cpus` (taskset's form). Raises Unprepared, saying why, where that failed."""
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    log = base / "prepare.log"
    model = Path(limits.model)
    given = model.suffix == ".gguf"  # served as it is: Baton's arms serve the same weights
    if given and q8:
        raise Unprepared(f"{model.name} is a GGUF: the llama-cpp arm serves it as it is")
    try:
        bin_dir = build(base, log)
        gguf = model if given else convert(base, model, limits.dtype, q8, bin_dir, log)
        config_dir = resolve_model_dir(model) if given else model  # (converts a GGUF once)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        raise Unprepared(f"could not prepare it: {e} (see {log})") from e
    ctx = kv_tokens(config_dir, limits.dtype, limits.kv_cache_gib)
    if limits.max_model_len:
        ctx = min(ctx, limits.max_num_seqs * limits.max_model_len)
    threads, kv_type = str(len(limits.cpus)), TYPES[limits.dtype][0]
    batch = str(limits.max_num_batched_tokens)
    return [
        "taskset", "-c", cpus, str(bin_dir / "llama-server"), "-m", str(gguf),
        "--host", "127.0.0.1", "--port", str(port), "-t", threads, "-tb", threads,
        "-np", str(limits.max_num_seqs), "-c", str(ctx), "-b", batch, "-ub", batch,
        "-ctk", kv_type, "-ctv", kv_type, "-kvu", "--no-webui",
    ]  # fmt: skip
