import sys
from pathlib import Path

import pytest

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
