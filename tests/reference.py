"""What the tests share: the engine flags their stacks run with, transformers' greedy output
(the reference every served token is compared with), and a kernel's closeness to its torch
reference in ulps."""

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

# small chunk budget: long prompts are split; blocks of 16 tokens
# work stealing off: where each prompt prefills (and whether its KV moves) is then the test's
# to say, not a race between concurrent prompts
ENGINE = ("--max-num-batched-tokens", "32", "--num-blocks", "160", "--busy-prefill-tokens", "0")


def hf_greedy(model_dir, prompts, new) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False)
        out.append(y[0, len(ids) :].tolist())
    return out


def adjusted(logits: list[float], prompt, out, bias=(), rep=1.0, freq=0.0, pres=0.0):
    """vLLM's logit bias and penalties, written out one token at a time: the bias added;
    repetition divides a positive logit (multiplies a negative one) of a token seen in the
    prompt or the output; frequency takes penalty x count in the output off, presence the
    penalty once."""
    logits = list(logits)
    for t, b in bias:
        logits[t] += b
    for t in set(prompt) | set(out):
        logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
    for t, count in Counter(out).items():
        logits[t] -= freq * count + pres
    return logits


def assert_close(got: torch.Tensor, want: torch.Tensor, ulps: int) -> None:
    """Equal within `ulps` units of the dtype's precision, relative and absolute; NaN (an
    element never written) only where the reference has NaN too."""
    tol = ulps * torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)


def packed_or_skip(packed: torch.Tensor | None, needs: str) -> torch.Tensor:
    """A C kernel's packed weight, or the test skipped: this CPU lacks what the kernel `needs`."""
    if packed is None:
        pytest.skip(f"the C linear layer serves only on a CPU with {needs}")
    return packed
