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
        self.tokenizer: llguidance.LLTokenizer | None = None  # made at the first grammar (~0.3 s)
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

    def bitmask(self, seqs: list[Sequence]) -> torch.Tensor:
        """[len(seqs), words] int32: bit t % 32 of word t // 32 set where the sequence may
        sample token t next under its grammar (llguidance's bitmask). A grammar that fails
        here (the gateway validated it) allows only ending, and says why in the log."""
        for seq in seqs:
            if seq.grammar is None:
                seq.grammar = self.compile(seq.params.grammar)
                seq.grammar.consume_tokens(seq.output_token_ids)
        words = (self.vocab_size + 31) // 32
        mask = torch.full((len(seqs), words), -1, dtype=torch.int32)
        for i, seq in enumerate(seqs):  # ~5 us each; llguidance's thread pool would fight
            # the engine's OpenMP threads for the cores (a batch of 32 decoded 1.26x slower)
            seq.grammar.unsafe_compute_mask_ptr(mask[i].data_ptr(), words * 4)
            if seq.grammar.is_error():
                log.warning("%s: grammar error: %s", seq.req_id, seq.grammar.get_error())
                ends = torch.zeros(words * 32, dtype=torch.bool)
                ends[self.eos] = True
                mask[i] = pack(ends)
        return mask


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """[words * 32] bool -> [words] int32 bitmask, bit i of word w for token 32w + i."""
    bits = allowed.view(-1, 32).to(torch.int64) << torch.arange(32)
    return bits.sum(-1).to(torch.int32)  # wraps bit 31 into the sign, as the words hold it
