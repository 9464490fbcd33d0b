"""What structured outputs cost on SmolLM2: the decode time per output token with every request
of a batch under a JSON schema, beside the same batch with none; and a grammar's compile time,
cold (the service's first grammar: its tokenizer too), new (another schema) and cached.

    python -m baton.benchmarks.structured_bench [--batches 1 32] [--new 64] [--dtype bfloat16]

Each row: `batch` prompts of 128 tokens, `new` tokens each, greedy; the time of the decode
steps only (after every first token), per step. The schema keeps every answer inside one long
string, so the grammar masks each of those steps.
"""

import argparse
import time

import torch
from llguidance import LLMatcher

import baton
from baton.gateway.grammars import JSON_STYLE
from baton.request import Sequence

STORY = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 4000, "maxLength": 4000}},
    "required": ["story"],
}
OTHER = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "tags", "age"],
}


def grammar(schema: dict) -> str:
    return LLMatcher.grammar_from_json_schema(schema, JSON_STYLE)


def decode_step_ms(llm, batch: int, new: int, grammar_text: str | None) -> float:
    params = baton.SamplingParams(
        max_tokens=new, temperature=0, ignore_eos=True, grammar=grammar_text
    )
    g = torch.Generator().manual_seed(batch)
    for i, ids in enumerate(torch.randint(100, 40000, (batch, 128), generator=g).tolist()):
        llm.scheduler.add(Sequence(f"s{batch}-{grammar_text is None}-{i}", ids, params))
    seqs = list(llm.scheduler.waiting)
    while any(s.num_output_tokens == 0 for s in seqs):
        llm.step({})
    steps, t = 0, time.perf_counter()
    while llm.scheduler.has_work:
        llm.step({})
        steps += 1
    return (time.perf_counter() - t) / steps * 1e3


def compile_ms(grammars, text: str) -> float:
    t = time.perf_counter()
    grammars.compile(text)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    llm = baton.LLM(dtype=args.dtype)
    grammars = llm.engine.runner.sampler.grammars
    story, other = grammar(STORY), grammar(OTHER)
    cold = compile_ms(grammars, story)
    print(f"grammar compile: cold {cold:.1f} ms (the tokenizer's setup included), "
          f"another schema {compile_ms(grammars, other):.2f} ms, "
          f"cached {compile_ms(grammars, story):.3f} ms")  # fmt: skip
    print(f"\n{args.dtype}, {torch.get_num_threads()} threads, {args.new} new tokens\n")
    print("| batch | no grammar ms/step | json_schema ms/step | ratio |")
    print("|---|---|---|---|")
    for batch in args.batches:
        free = decode_step_ms(llm, batch, args.new, None)
        bound = decode_step_ms(llm, batch, args.new, story)
        print(f"| {batch} | {free:.2f} | {bound:.2f} | {bound / free:.2f}x |")


if __name__ == "__main__":
    main()
