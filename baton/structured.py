"""Structured outputs on a service: a grammar (llguidance's, which the gateway built from the
request's `response_format` and validated) masks each sampled token's logits to the tokens
that keep the output inside it.

Each distinct grammar is compiled once per service (a matcher kept, LRU, and copied per
request). A sequence's matcher is made at its first sampled token here and first fed the
output the sequence already has: none on the prefill, the prefill's first token on a decode,
every streamed token on a resumed stream. So a constrained greedy request gives the same
tokens whether it ran split, aggregated or failed over.
"""

import logging
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from baton.request import Sequence

log = logging.getLogger("baton.structured")

MAX_GRAMMARS = 64  # compiled grammars kept per service


class Grammars:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, eos: frozenset[int]
    ):
        self.hf, self.vocab_size, self.eos = tokenizer, vocab_size, sorted(eos)
        self.tokenizer: llguidance.LLTokenizer | None = None  # made at the first grammar (~1 s)
        self.compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def compile(self, grammar: str) -> llguidance.LLMatcher:
        if self.tokenizer is None:
            if self.hf is None:
                raise ValueError("structured outputs need the model's tokenizer")
            self.tokenizer = llguidance.hf.from_tokenizer(self.hf, n_vocab=self.vocab_size)
        matcher = self.compiled.pop(grammar, None)
        if matcher is None:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        self.compiled[grammar] = matcher  # the newest last
        while len(self.compiled) > MAX_GRAMMARS:
            self.compiled.popitem(last=False)
        return matcher.deep_copy()

    def allowed(self, seq: Sequence) -> torch.Tensor:
        """[vocab] bool: the tokens `seq` may sample next under its grammar. One that fails
        here (the gateway validated it) allows only ending, and says why in the log."""
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        if seq.grammar is None:
            seq.grammar = self.compile(seq.params.grammar)
            seq.grammar.consume_tokens(seq.output_token_ids)
        if seq.grammar.is_error():
            log.warning("%s: grammar error: %s", seq.req_id, seq.grammar.get_error())
            allowed[self.eos] = True
            return allowed
        bias = torch.frombuffer(bytearray(seq.grammar.compute_logit_bias()), dtype=torch.uint8)
        n = min(len(bias), self.vocab_size)
        allowed[:n] = bias[:n] > 0
        return allowed
