"""Seeded workloads: sessions of turns whose prompt and output lengths are exact.

Every request is a turn of a session. Single-turn workloads are one-turn sessions; an agent
session sends, per turn, the whole context so far (previous prompt + the answer + a tool
result). Prompts are token ids drawn from the served model's vocabulary with special tokens
left out, and are sent as ids, so no re-tokenization can change a length.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# kind -> (number of parameters, sampler(rng, n, *params) -> floats)
DISTRIBUTIONS: dict[str, tuple[int, Callable[..., np.ndarray]]] = {
    "fixed": (1, lambda rng, n, v: np.full(n, v)),
    "uniform": (2, lambda rng, n, lo, hi: rng.uniform(lo, hi, n)),
    "normal": (2, lambda rng, n, mean, std: rng.normal(mean, std, n)),
    "lognormal": (2, lambda rng, n, median, sigma: median * rng.lognormal(0, sigma, n)),
    "exp": (1, lambda rng, n, mean: rng.exponential(mean, n)),
}


@dataclass(frozen=True)
class Dist:
    """A length (or time) distribution written `512`, `uniform:256:768`, `normal:512:64`,
    `lognormal:MEDIAN:SIGMA` or `exp:MEAN`."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> "Dist":
        kind, *rest = spec.split(":")
        if not rest:
            kind, rest = "fixed", [kind]
        if kind not in DISTRIBUTIONS or len(rest) != DISTRIBUTIONS[kind][0]:
            forms = "N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA, exp:MEAN"
            raise ValueError(f"bad distribution {spec!r}; use one of {forms}")
        return cls(kind, tuple(float(x) for x in rest))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return DISTRIBUTIONS[self.kind][1](rng, n, *self.params)

    def lengths(self, rng: np.random.Generator, n: int) -> list[int]:
        """Token counts: rounded, at least 1 (a normal's left tail would give <= 0)."""
        return [max(1, round(x)) for x in self.sample(rng, n)]

    def __str__(self) -> str:
        params = [f"{p:g}" for p in self.params]
        return ":".join(params if self.kind == "fixed" else [self.kind, *params])


Ids = Callable[[int], list[int]]  # n -> n token ids drawn from the vocabulary


@dataclass(frozen=True)
class Turn:
    new_ids: list[int]  # appended to the context; turn 0's are the whole first prompt
    max_tokens: int  # forced with ignore_eos, so it is also the output length
    think_s: float = 0.0  # pause after the previous answer before this turn is sent
    # a chat turn that must call one of client.TOOLS (tool_choice "required"): its length is
    # the call's, max_tokens only a cap
    tools: bool = False


@dataclass(frozen=True)
class Session:
    turns: list[Turn]


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "random"  # random | shared-prefix | mixed | shift | agent | tools
    num_requests: int = 64  # turns in all; agent sessions get num_requests // turns
    # the prompt; the short ones in mixed; what follows the prefix in shared-prefix
    input_len: Dist = Dist("fixed", (512,))
    output_len: Dist = Dist("fixed", (128,))
    prefix_len: int = 1024  # shared-prefix: the system prompt every request starts with
    long_len: Dist = Dist("uniform", (2048, 4096))  # mixed, shift: the long prompts
    long_output_len: Dist = Dist("fixed", (64,))
    long_fraction: float = 0.1
    turns: int = 4  # agent: turns per session
    tool_len: Dist = Dist("uniform", (64, 256))  # agent: tool result added per turn
    think_s: Dist = Dist("exp", (1,))  # agent: pause between turns

    def describe(self) -> str:
        io = f"in {self.input_len} out {self.output_len}"
        extra = {
            "random": "",
            "shared-prefix": f", prefix {self.prefix_len}",
            "mixed": f", {self.long_fraction:.0%} long in {self.long_len} out {self.long_output_len}",
            "shift": f", then as many in {self.long_len} out {self.long_output_len}",
            "agent": f", {self.turns} turns, tool {self.tool_len}, think {self.think_s}s",
            "tools": ", chat turns that must call a tool (output: its cap)",
        }[self.name]
        return f"{self.name} ({self.num_requests} requests, {io}{extra})"


def vocabulary(tokenizer) -> np.ndarray:
    """Token ids a prompt may hold: all but the special ones (BOS/EOS/chat markers)."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special])


def build(spec: WorkloadSpec, vocab: np.ndarray, seed: int) -> list[Session]:
    """The same (spec, vocab, seed) gives the same sessions, token for token."""
    rng = np.random.default_rng(seed)
    return BUILDERS[spec.name](spec, rng, lambda n: rng.choice(vocab, n).tolist())


def single_turns(prompts: Sequence[list[int]], outputs: Sequence[int]) -> list[Session]:
    return [Session([Turn(p, o)]) for p, o in zip(prompts, outputs, strict=True)]


def random_lengths(spec: WorkloadSpec, rng: np.random.Generator, ids: Ids) -> list[Session]:
    n = spec.num_requests
    prompts = [ids(k) for k in spec.input_len.lengths(rng, n)]
    return single_turns(prompts, spec.output_len.lengths(rng, n))


def shared_prefix(spec: WorkloadSpec, rng: np.random.Generator, ids: Ids) -> list[Session]:
    n = spec.num_requests
    prefix = ids(spec.prefix_len)
    prompts = [prefix + ids(k) for k in spec.input_len.lengths(rng, n)]
    return single_turns(prompts, spec.output_len.lengths(rng, n))


def mixed(spec: WorkloadSpec, rng: np.random.Generator, ids: Ids) -> list[Session]:
    """A few long prompts at random places among short chats: prefill work that lands
    while the short requests decode."""
    n = spec.num_requests
    num_long = round(n * spec.long_fraction)
    is_long = np.zeros(n, dtype=bool)
    is_long[rng.choice(n, num_long, replace=False)] = True
    short_in, short_out = spec.input_len.lengths(rng, n), spec.output_len.lengths(rng, n)
    long_in, long_out = spec.long_len.lengths(rng, n), spec.long_output_len.lengths(rng, n)
    prompts = [ids(long_in[i] if is_long[i] else short_in[i]) for i in range(n)]
    outputs = [long_out[i] if is_long[i] else short_out[i] for i in range(n)]
    return single_turns(prompts, outputs)


def shift(spec: WorkloadSpec, rng: np.random.Generator, ids: Ids) -> list[Session]:
    """The mix shifts halfway: the first half's lengths are input_len/output_len, the second
    half's long_len/long_output_len (long answers, then long prompts: a split that suits one
    half does not suit the other)."""
    first, second = spec.num_requests // 2, spec.num_requests - spec.num_requests // 2
    prompts = [
        ids(k) for k in spec.input_len.lengths(rng, first) + spec.long_len.lengths(rng, second)
    ]
    outputs = spec.output_len.lengths(rng, first) + spec.long_output_len.lengths(rng, second)
    return single_turns(prompts, outputs)


def agent(spec: WorkloadSpec, rng: np.random.Generator, ids: Ids) -> list[Session]:
    """Each turn after the first adds the last answer (known only at run time) and a tool
    result to the context, after a think time."""
    sessions = []
    for _ in range(max(1, spec.num_requests // spec.turns)):
        firsts = spec.input_len.lengths(rng, 1) + spec.tool_len.lengths(rng, spec.turns - 1)
        outputs = spec.output_len.lengths(rng, spec.turns)
        thinks = [0.0, *spec.think_s.sample(rng, spec.turns - 1).clip(0)]
        turns = [Turn(ids(k), o, float(t)) for k, o, t in zip(firsts, outputs, thinks, strict=True)]
        sessions.append(Session(turns))
    return sessions


def tools(spec: WorkloadSpec, rng: np.random.Generator, ids: Ids) -> list[Session]:
    """Single chat turns (the prompt's ids as the user's text) that must call a tool."""
    n = spec.num_requests
    caps = spec.output_len.lengths(rng, n)
    return [
        Session([Turn(ids(k), cap, tools=True)])
        for k, cap in zip(spec.input_len.lengths(rng, n), caps, strict=True)
    ]


BUILDERS = {
    "tools": tools,
    "random": random_lengths,
    "shared-prefix": shared_prefix,
    "mixed": mixed,
    "shift": shift,
    "agent": agent,
}


def _spec(name: str, input_len: str, output_len: str, **more: str | float | int) -> WorkloadSpec:
    dists = {k: Dist.parse(v) if isinstance(v, str) else v for k, v in more.items()}
    return WorkloadSpec(name, 0, Dist.parse(input_len), Dist.parse(output_len), **dists)


# `baton bench compare --matrix`: the traffic shapes a default deployment must serve, each
# with rates from light load to past what 2 CPU cores sustain for SmolLM2-135M (sessions/s)
MATRIX: dict[str, tuple[WorkloadSpec, tuple[float, ...]]] = {
    "short": (_spec("random", "uniform:32:256", "uniform:32:128"), (2, 4, 8)),
    "mixed": (
        _spec("mixed", "uniform:64:256", "128", long_len="uniform:2048:4096", long_fraction=0.05),
        (1, 2, 4),
    ),
    "long-prompt": (_spec("random", "uniform:300:2000", "100"), (0.25, 0.5, 1)),
    "long-output": (_spec("random", "uniform:32:256", "uniform:300:700"), (0.25, 0.5, 1)),
    "chat": (
        _spec("agent", "uniform:64:512", "uniform:32:300", tool_len="uniform:16:128"),
        (0.25, 0.5, 1),
    ),
}
