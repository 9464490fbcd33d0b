"""What one worker's steps cost on this machine, as planes fitted to measured steps:

    prefill step = prefill_fixed_s + prefill_per_token_s x tokens + prefill_per_pair_s x pairs
    decode step  = decode_fixed_s + decode_per_seq_s x batch + decode_per_ctx_token_s x context
    KV hand-off  = handoff_fixed_s + handoff_per_token_s x prompt tokens

pairs: the (query, key) scores a prompt chunk's attention computes, n x c + n(n+1)/2 for n
tokens after c cached ones (on CPU it makes long prompts clearly superlinear); context: the
tokens the decode batch attends to, summed. Plain Python and numpy; `measure.py` produces
the samples with a real engine.
"""

import itertools
from pathlib import Path

import msgspec
import numpy as np


def attention_pairs(num_cached: int, num_new: int) -> int:
    return num_new * num_cached + num_new * (num_new + 1) // 2


class Profile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    dtype: str
    threads: int  # torch threads of the worker that was timed
    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_per_pair_s: float
    decode_fixed_s: float
    decode_per_seq_s: float
    decode_per_ctx_token_s: float
    handoff_fixed_s: float
    handoff_per_token_s: float
    # what the planes were fitted to: (prompt tokens, s), each prompt one step from empty;
    # (batch, context tokens, s)
    prefill_samples: list[tuple[int, float]] = []
    decode_samples: list[tuple[int, int, float]] = []

    @classmethod
    def fit(
        cls,
        *,
        prefill_samples: list[tuple[int, float]],
        decode_samples: list[tuple[int, int, float]],
        **fields,
    ) -> "Profile":
        """Planes through the samples; `fields` carries the rest (model, dtype, threads,
        hand-off)."""
        prefill_rows = [(1.0, n, attention_pairs(0, n)) for n, _ in prefill_samples]
        prefill = nonnegative_lstsq(prefill_rows, [s for _, s in prefill_samples])
        decode_rows = [(1.0, batch, ctx) for batch, ctx, _ in decode_samples]
        decode = nonnegative_lstsq(decode_rows, [s for *_, s in decode_samples])
        return cls(
            prefill_fixed_s=prefill[0],
            prefill_per_token_s=prefill[1],
            prefill_per_pair_s=prefill[2],
            decode_fixed_s=decode[0],
            decode_per_seq_s=decode[1],
            decode_per_ctx_token_s=decode[2],
            prefill_samples=prefill_samples,
            decode_samples=decode_samples,
            **fields,
        )

    def step_s(
        self,
        prefill_tokens: int = 0,
        prefill_pairs: int = 0,
        num_decodes: int = 0,
        context_tokens: int = 0,
    ) -> float:
        """One engine step over prompt chunks and decodes together (a decode that prefills
        locally mixes both): the fixed cost is paid once, the larger of the two."""
        fixed = max(
            self.prefill_fixed_s if prefill_tokens else 0.0,
            self.decode_fixed_s if num_decodes else 0.0,
        )
        return (
            fixed
            + self.prefill_per_token_s * prefill_tokens
            + self.prefill_per_pair_s * prefill_pairs
            + self.decode_per_seq_s * num_decodes
            + self.decode_per_ctx_token_s * context_tokens
        )

    def handoff_s(self, prompt_tokens: int) -> float:
        return self.handoff_fixed_s + self.handoff_per_token_s * prompt_tokens

    def describe(self) -> str:
        return (
            f"{self.model} ({self.dtype}, {self.threads} thread(s) a worker): "
            f"prefill {self.prefill_fixed_s * 1e3:.1f} ms + {self.prefill_per_token_s * 1e3:.3f} ms/token "
            f"+ {self.prefill_per_pair_s * 1e9:.1f} ns/attention pair; "
            f"decode {self.decode_fixed_s * 1e3:.1f} ms + {self.decode_per_seq_s * 1e3:.3f} ms/seq "
            f"+ {self.decode_per_ctx_token_s * 1e6:.3f} us/context token; "
            f"hand-off {self.handoff_fixed_s * 1e3:.1f} ms + {self.handoff_per_token_s * 1e6:.3f} us/token"
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(self)) + b"\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return msgspec.json.decode(Path(path).read_bytes(), type=cls)


def nonnegative_lstsq(rows: list[tuple[float, ...]], ys: list[float]) -> list[float]:
    """Least squares in relative error (a 50 ms step matters as much as a 1 s one) with
    every coefficient >= 0 (a negative cost would let the simulator gain time from a bigger
    batch): the best fit over the subsets of columns whose unconstrained solution is
    non-negative; few columns, so trying them all is cheap."""
    seconds = np.asarray(ys, dtype=float)
    a = np.asarray(rows, dtype=float) / seconds[:, None]  # each row over its own time
    ones = np.ones(len(seconds))
    num_cols = a.shape[1]
    best, best_residual = [0.0] * num_cols, float(len(seconds))
    for k in range(1, num_cols + 1):
        for cols in itertools.combinations(range(num_cols), k):
            coef = np.linalg.lstsq(a[:, cols], ones, rcond=None)[0]
            if (coef < 0).any():
                continue
            residual = float(np.sum((a[:, cols] @ coef - ones) ** 2))
            if residual < best_residual:
                best = [0.0] * num_cols
                for c, v in zip(cols, coef, strict=True):
                    best[c] = float(v)
                best_residual = residual
    return best
