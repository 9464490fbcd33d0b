"""C kernels for the CPU (kernels/csrc/), built at first use with the system C compiler and
called through ctypes: no torch headers, so a build takes about a second.

The library is cached under $BATON_CACHE/kernels (default ~/.cache/baton/kernels), keyed by
the source, the flags and this CPU's feature flags (it is built with -march=native). Each
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
# -ffast-math only to compile (it vectorizes the reductions and expf): linked with it, the
# library would set flush-to-zero for the whole process as it loads (crtfastmath.o)
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _cache_dir() -> Path:
    root = os.environ.get("BATON_CACHE") or Path.home() / ".cache" / "baton"
    return Path(root) / "kernels"


def _build(cc: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
        run = functools.partial(subprocess.run, check=True, capture_output=True, text=True)
        run([cc, *FLAGS, "-c", "-o", str(obj), str(SOURCE)])
        run([cc, "-shared", "-fopenmp", "-o", str(lib), str(obj), "-lm"])
        os.replace(lib, path)


@functools.cache
def load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: decode attention runs on the torch path")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.blake2b(source + repr(FLAGS).encode() + _cpu_flags().encode()).hexdigest()
    path = _cache_dir() / f"paged_decode-{key[:16]}.so"
    try:
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:  # no compiler, read-only cache, ...
        why = getattr(e, "stderr", "") or e
        log.warning("building %s failed (%s): decode attention runs on torch", SOURCE, why)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.paged_decode_bf16, lib.paged_decode_f32):
        fn.argtypes = [ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64]
        fn.argtypes += [ctypes.c_float, ptr]
        fn.restype = ctypes.c_int
    return lib
