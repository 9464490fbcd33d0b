"""Logits -> next tokens, each row by its own request's SamplingParams.

Rows with a logit bias or a penalty are adjusted first (vLLM's order and math: the bias, then
repetition, frequency and presence penalties). Greedy rows take the argmax. Random rows apply
temperature, top-k, top-p and min-p, then draw with the request's own torch.Generator (seeded
from `seed` and the token's index), so a seeded request gives the same tokens whatever else
shares its batch and whichever services its tokens are sampled on.
Logprobs come from the raw model distribution, as vLLM's do by default.

A sequence's token ids are its prompt then its output, on the prefill (no output yet) as on a
decode or a resumed one, so the penalties see the same history wherever a token is sampled.
"""

import hashlib

import torch

from baton import kernels
from baton.request import Logprob, Sequence
from baton.scheduler import SampledToken
from baton.structured import Grammars


def _filter(logits: torch.Tensor, top_k: int | None, top_p: float, min_p: float) -> torch.Tensor:
    """Mask out (to -inf) tokens outside top-k / top-p / min-p of one row."""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def adjust(row: torch.Tensor, seq: Sequence) -> None:
    """Add `seq`'s logit bias and apply its penalties to its row of fp32 logits, in place."""
    p = seq.params
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias, strict=True)
        row[list(ids)] += torch.tensor(bias)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.token_ids).unique()
        x = row[seen]
        row[seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.num_output_tokens:
        ids, counts = torch.tensor(seq.output_token_ids).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts + p.presence_penalty


def _generator(seq: Sequence) -> torch.Generator | None:
    """A seeded request's noise for its n-th output token comes from (seed, n) alone, so any
    service that samples token n draws the same: the prefill token 0, its decode the rest,
    and after a failover another decode from where the stream stopped (reliability L18)."""
    if seq.params.seed is None:
        return None
    if seq.sampler_state is None:
        seq.sampler_state = torch.Generator()
    key = f"{seq.params.seed}:{seq.num_output_tokens}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return seq.sampler_state.manual_seed(seed)


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int], grammars: Grammars | None = None):
        self.eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long)
        self.grammars = grammars

    @torch.inference_mode()  # the logits are the model's inference tensor: changed in place
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        logits = logits.float()
        # logprobs come from the model's own distribution: kept aside only when asked for
        raw = logits.clone() if any(s.params.logprobs is not None for s in seqs) else logits
        for i, seq in enumerate(seqs):  # EOS and stop ids are banned until min_tokens
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = [*p.stop_token_ids, *([] if p.ignore_eos else self.eos.tolist())]
                logits[i, banned] = float("-inf")
            if p.adjusts_logits:
                adjust(logits[i], seq)
        ruled = [i for i, s in enumerate(seqs) if s.params.grammar is not None]
        if ruled:
            assert self.grammars is not None, "a grammar reached a sampler without one"
            mask = self.grammars.bitmask([seqs[i] for i in ruled])
            kernels.apply_token_bitmask(logits, mask, torch.tensor(ruled))
        tokens = kernels.argmax(logits).tolist()
        for i, seq in enumerate(seqs):
            p = seq.params
            if not p.greedy:
                row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
                probs = row.softmax(-1)
                # exponential race: argmax(p / E) with E ~ Exp(1) draws from p
                noise = torch.empty_like(probs).exponential_(generator=_generator(seq))
                tokens[i] = int((probs / noise).argmax())
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.grammar is not None:
                seq.grammar.consume_token(token)
        out = [SampledToken(t) for t in tokens]
        wants = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wants:
            logprobs = raw[wants].log_softmax(-1)
            for row, i in enumerate(wants):
                n = seqs[i].params.logprobs
                top = torch.topk(logprobs[row], n) if n else None
                out[i].logprob = Logprob(
                    token_id=tokens[i],
                    logprob=float(logprobs[row, tokens[i]]),
                    top=list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                    if top is not None
                    else [],
                )
        return out
