import random
import subprocess
import sys
from pathlib import Path

import pytest

from baton.bench import llamacpp

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root) -> Path:
    return make_tiny_model(tiny_root, "llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from baton.model.files import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def tiny_text_model(tiny_root, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer: serves text through the gateway."""
    return make_tiny_model(tiny_root, "llama", tokenizer_from=smollm2_dir)


@pytest.fixture(scope="session")
def gguf_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from the llama-cpp-python sdist on PyPI (downloaded
    once into the anchors' cache, as the llama-cpp benchmark arms do)."""
    base = llamacpp.root()
    base.mkdir(parents=True, exist_ok=True)
    try:
        return llamacpp.source(base, base / "prepare.log") / "convert_hf_to_gguf.py"
    except subprocess.CalledProcessError as e:  # no package index reachable
        pytest.skip(f"llama.cpp's converter could not be fetched ({e}; see {base}/prepare.log)")


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A 512-piece SentencePiece model trained on seeded random words: llama.cpp converts
    Gemma and Phi-3 only with one (their checkpoints ship it)."""
    import sentencepiece

    root = tmp_path_factory.mktemp("spm")
    seed = 24
    print("seed", seed)
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(2000)
    ]
    (root / "text.txt").write_text(
        "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(3000))
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "text.txt"), model_prefix=str(root / "tok"), vocab_size=512,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
    )  # fmt: skip
    return root / "tok.model"
