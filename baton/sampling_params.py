"""Per-request sampling settings: a msgspec Struct, so the same object crosses every socket."""

import math

import msgspec

GREEDY_BELOW = 1e-5


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    min_p: float = 0.0
    # vLLM's math: repetition divides a positive logit (multiplies a negative one) of every
    # token in the prompt or the output; frequency takes penalty x count in the output off,
    # presence the penalty once; the bias is added first
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str | None = None  # llguidance's, from response_format: output stays inside it
    seed: int | None = None  # per-request RNG: same seed, same output, whatever the batch
    stop: tuple[str, ...] = ()  # matched on detokenized text, never returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per sampled token (0: only the sampled one)
    # scheduling, not sampling, but it must reach both schedulers: lower runs sooner (vLLM's
    # convention); equal priorities go first come first served
    priority: int = 0
    # cache retention, not sampling, likewise for both: an agent session's blocks stay cached
    # (the last evicted) this long after the request ends (x-session-ttl-s)
    session_ttl_s: float = 0.0
    # the root of its block hash chain: cached prefixes are shared only with requests of
    # the same root, i.e. tenant and cache_salt (gateway.sessions.cache_salt); None: with all
    cache_salt: bytes | None = None

    def __post_init__(self) -> None:
        checks = [
            (
                0 <= self.session_ttl_s < math.inf,
                f"session_ttl_s must be >= 0 and finite, got {self.session_ttl_s}",
            ),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (
                0 <= self.min_tokens <= self.max_tokens,
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
            ),
            (
                0 <= self.temperature < math.inf,
                f"temperature must be >= 0 and finite, got {self.temperature}",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be in [0, 20], got {self.logprobs}",
            ),
            (all(s for s in self.stop), "stop strings must be non-empty"),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                0 < self.repetition_penalty <= 2,
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
            ),
            (
                all(-100 <= b <= 100 for _, b in self.logit_bias),
                "logit_bias values must be in [-100, 100]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        # below this, logits / T overflows to NaN: it is greedy in all but name (vLLM's eps)
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """Whether a bias or a penalty changes this request's logits before sampling."""
        return bool(self.logit_bias) or (
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
        ) != (0.0, 0.0, 1.0)
