"""Bad models and oversized requests fail early with the numbers involved."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

import baton
from baton.model.files import default_model_path, resolve_model_dir
from baton.model.registry import UnsupportedModel
from baton.sampling_params import SamplingParams


def test_unknown_model_path():
    with pytest.raises(FileNotFoundError, match="neither a GGUF file nor a directory"):
        baton.LLM("/nonexistent/model", dtype="float32")


def test_a_model_cache_others_can_write_is_refused(tmp_path, monkeypatch):
    # converted weights found there would be loaded as they are
    (tmp_path / "models").mkdir()
    (tmp_path / "models").chmod(0o777)
    monkeypatch.setenv("BATON_CACHE", str(tmp_path))
    with pytest.raises(PermissionError, match="models is not a private directory"):
        resolve_model_dir(default_model_path())


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path
    )
    with pytest.raises(
        UnsupportedModel,
        match="'gpt2'.*supports gemma2, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe",
    ):
        baton.LLM(str(tmp_path), dtype="float32")


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return baton.LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=8, max_model_len=40)


def test_prompt_longer_than_the_context(llm):
    with pytest.raises(ValueError, match="prompt has 45 tokens; the context limit is 40"):
        llm.generate([[5] * 45])


def test_more_kv_than_the_pool_holds(llm):
    with pytest.raises(ValueError, match=r"needs up to 10 KV blocks \(20 prompt \+ 20 new"):
        llm.generate([[5] * 20], SamplingParams(max_tokens=20))


def test_token_ids_outside_the_vocabulary(llm):
    # they would index past the embedding table: refused before any forward
    for ids in ([5, 512], [-1, 5]):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
            llm.generate([ids])


def test_text_prompt_without_a_tokenizer_and_empty_prompt(llm):
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["hello"])
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]])


def test_bad_engine_config_values():
    with pytest.raises(ValueError, match=r"Expected `int` >= 1 - at `\$.block_size`"):
        baton.LLM(None, block_size=0)
