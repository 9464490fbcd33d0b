"""Tenants: several API keys, and a prefix cache each tenant (API key) and each cache_salt
keeps to itself, so no request's prefix hit, or its timing, tells what another tenant sent
(reliability review L11; vLLM's cache_salt). On a live 1P+1D stack."""

import openai
import pytest
from stack import Stack

KEYS = ("sk-tenant-a", "sk-tenant-b")


def prompt(seed: int) -> list[int]:
    """Ten 16-token blocks, a different prompt per seed."""
    return [(i * 37 + seed * 101) % 4000 + 10 for i in range(161)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model):
    root = tmp_path_factory.mktemp("tenants")
    keys = root / "keys.txt"
    keys.write_text(f"# one a line\n{KEYS[0]}\n\n{KEYS[1]}\n")
    s = Stack(root / "logs", tiny_text_model, "--api-key-file", str(keys))
    yield s
    s.stop()


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def hit_tokens(stack: Stack) -> float:
    """Prompt tokens whose KV came from a prefix cache, on every service."""
    return sum(
        stack.metric(name, "baton_prefix_cache_hit_tokens_total")
        for name in stack.services()
        if name != "gateway"
    )


def complete(stack: Stack, key: str, ids: list[int], **extra) -> None:
    r = client(stack, key).completions.create(
        model="", prompt=ids, max_tokens=2, temperature=0, extra_body=extra or None
    )
    assert r.choices[0].finish_reason == "length"


def test_every_key_in_the_file_is_accepted_and_no_other(stack):
    for key in KEYS:
        assert client(stack, key).models.list().data
    with pytest.raises(openai.AuthenticationError):
        client(stack, "sk-tenant-c").models.list()


def test_a_tenant_hits_only_its_own_cached_prefixes(stack):
    ids = prompt(1)
    complete(stack, KEYS[0], ids)
    before = hit_tokens(stack)
    complete(stack, KEYS[1], ids)  # the same prompt, another tenant: computed again
    assert hit_tokens(stack) == before
    complete(stack, KEYS[1], ids)  # its own, now cached
    assert hit_tokens(stack) >= before + 160


def test_a_cache_salt_splits_one_tenants_cache(stack):
    ids = prompt(2)
    complete(stack, KEYS[0], ids, cache_salt="user-1")
    before = hit_tokens(stack)
    complete(stack, KEYS[0], ids, cache_salt="user-2")
    complete(stack, KEYS[0], ids)  # no salt is a salt of its own too
    assert hit_tokens(stack) == before
    complete(stack, KEYS[0], ids, cache_salt="user-2")
    assert hit_tokens(stack) >= before + 160
