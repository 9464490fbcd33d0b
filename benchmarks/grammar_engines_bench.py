"""Why llguidance: xgrammar beside it on structured_bench's schemas, SmolLM2's tokenizer
(49,152 tokens): the tokenizer's setup (once per service), each schema's compile time, and the
time to fill one token mask inside a JSON string (every constrained step pays it).

    pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi   # not a dependency of Baton
    python -m baton.benchmarks.grammar_engines_bench
"""

import json
import time

import llguidance
import llguidance.hf
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from baton.benchmarks.structured_bench import OTHER, STORY, grammar
from baton.model.files import resolve_model_dir

V = 49152


def ms(f, n=1):
    """f's mean time in ms over n calls, and its last result."""
    t0 = time.perf_counter()
    for _ in range(n):
        out = f()
    return (time.perf_counter() - t0) / n * 1e3, out


def main() -> None:
    t = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    c_tok, info = ms(lambda: xgr.TokenizerInfo.from_huggingface(t, vocab_size=V))
    c_comp, comp = ms(lambda: xgr.GrammarCompiler(info))
    s1, story = ms(
        lambda: comp.compile_json_schema(
            json.dumps(STORY), any_whitespace=False, separators=(", ", ": ")
        )
    )
    s2, _ = ms(
        lambda: comp.compile_json_schema(
            json.dumps(OTHER), any_whitespace=False, separators=(", ", ": ")
        )
    )
    m = xgr.GrammarMatcher(story)
    for tok in t.encode('{"story": "Once upon a time there'):
        assert m.accept_token(tok), tok
    mask = xgr.allocate_token_bitmask(1, V)
    fill, _ = ms(lambda: m.fill_next_token_bitmask(mask), 200)
    print(
        f"xgrammar: tokenizer info {c_tok:.0f} ms (+compiler {c_comp:.0f}), STORY {s1:.1f} ms, OTHER {s2:.1f} ms, mask in a string {fill * 1000:.1f} us"
    )

    l_tok, lt = ms(lambda: llguidance.hf.from_tokenizer(t, n_vocab=V))
    g1, g2 = grammar(STORY), grammar(OTHER)
    c1, lm = ms(lambda: llguidance.LLMatcher(lt, g1))
    c2, _ = ms(lambda: llguidance.LLMatcher(lt, g2))
    lm.consume_tokens(t.encode('{"story": "Once upon a time there'))
    buf = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
    lfill, _ = ms(lambda: lm.unsafe_compute_mask_ptr(buf.data_ptr(), buf.shape[1] * 4), 200)
    print(
        f"llguidance: tokenizer {l_tok:.0f} ms, STORY {c1:.1f} ms, OTHER {c2:.1f} ms, mask in a string {lfill * 1000:.1f} us"
    )


if __name__ == "__main__":
    main()
