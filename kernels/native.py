"""C kernels for the CPU (kernels/csrc/: decode and extend attention, the KV scatter, the fused
add + RMSNorm, rotary, the linear layer (bf16 or int8 weights), greedy sampling's argmax), built into one library
at first use with the system C compiler and called through ctypes: no torch headers, so a build
takes about a second. OpenMP threads come from the libgomp torch has loaded already (same
soname), so the kernels and torch's own ops share one pool.

The library is cached under $BATON_CACHE/kernels (default ~/.cache/baton/kernels), keyed by
the sources, the flags and this CPU's feature flags (it is built with -march=native); a cache
directory another user could write is refused (the library is code every service runs). Each
process builds into a temporary name and renames it into place, so services starting together
never load a half-written file. `load()` returns None, and logs why once, when no compiler
works: the torch ops then serve alone.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from baton.model.files import cache_root, private_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -ffast-math only to compile (it vectorizes the reductions and expf): linked with it, the
# library would set flush-to-zero for the whole process as it loads (crtfastmath.o)
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
# sources whose float arithmetic must round as their torch reference's: linear_i8.c quantizes
# activations by true divisions (-ffast-math turns amax / 127 into amax times a rounded 1 / 127)
EXACT = {"linear_i8": ["-fno-fast-math"]}
OPENMP = ["-fopenmp"]  # where the compiler has no OpenMP (Apple's clang), the kernels run serial


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _compile(cc: str, openmp: list[str], tmp: Path) -> Path:
    run = functools.partial(subprocess.run, check=True, capture_output=True, text=True)
    objects = []
    for source in sorted(CSRC.glob("*.c")):
        objects.append(str(tmp / f"{source.stem}.o"))
        flags = [*FLAGS, *EXACT.get(source.stem, [])]
        run([cc, *flags, *openmp, "-c", "-o", objects[-1], str(source)])
    lib = tmp / "kernels.so"
    run([cc, "-shared", *openmp, "-o", str(lib), *objects, "-lm"])
    return lib


def _build(cc: str, path: Path) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        try:
            lib = _compile(cc, OPENMP, Path(tmp))
        except subprocess.CalledProcessError as e:
            log.warning("building with OpenMP failed (%s): the kernels run serial", e.stderr)
            lib = _compile(cc, [], Path(tmp))
        os.replace(lib, path)


@functools.cache
def load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: the kernels run on the torch path")
        return None
    sources = b"".join(p.name.encode() + p.read_bytes() for p in sorted(CSRC.iterdir()))
    key = hashlib.blake2b(
        sources + repr((FLAGS, EXACT)).encode() + cpu_flags().encode()
    ).hexdigest()
    try:
        path = private_dir(cache_root() / "kernels") / f"kernels-{key[:16]}.so"
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:  # no compiler, a shared cache, ...
        why = getattr(e, "stderr", "") or e
        log.warning("building %s failed (%s): the kernels run on torch", CSRC, why)
        return None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    decode = [ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, f32, ptr]
    extend = [ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, f32, i64, f32, ptr]
    decode_i8 = [*[ptr] * 5, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, f32, ptr]
    rotary = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr]
    signatures = {
        ("paged_decode_bf16", "paged_decode_f32"): decode,
        ("paged_extend_bf16",): extend,
        ("paged_decode_i8",): decode_i8,
        ("add_rms_norm_bf16",): [ptr, ptr, ptr, i64, i64, f32, ptr, ptr],
        ("apply_rotary_bf16", "apply_rotary_f32"): rotary,
        ("linear_bf16_pack", "linear_i8_pack"): [ptr, i64, i64, ptr],
        ("linear_bf16",): [ptr, i64, i64, ptr, i64, ptr, ptr],
        ("linear_i8",): [ptr, i64, i64, ptr, ptr, i64, ptr, ptr],
        ("argmax_f32",): [ptr, i64, i64, ptr],
        ("apply_token_bitmask_f32",): [ptr, i64, ptr, i64, ptr, i64],
        ("write_kv",): [ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, ptr, ptr, i64],
        ("write_kv_i8_bf16",): [*[ptr] * 4, *[i64] * 4, ptr, i64, ptr, *[i64] * 3, ptr, ptr, i64],
    }
    for names, argtypes in signatures.items():
        for name in names:
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int
    return lib
