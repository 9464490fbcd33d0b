"""Token ids -> text, incrementally: never a broken UTF-8 sequence, stop strings matched across
token boundaries and never returned. Shared by baton.LLM and the gateway (no torch here)."""


class IncrementalDetokenizer:
    """Decodes output tokens one at a time. A few prompt tokens seed the window so the first
    output token gets the spacing it would have in context."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """The text that token completes (empty while it ends inside a UTF-8 character)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        window = self.ids[self.prefix_offset : self.read_offset]
        prefix = decode(window, skip_special_tokens=self.skip)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Once the output ends: the text its last tokens held back (they end inside a UTF-8
        character, as when max_tokens cuts one), written as a full decode of the ids writes it,
        with U+FFFD for the missing bytes, rather than dropped."""
        decode = self.tokenizer.decode
        prefix = decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip
        )
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Feeds text deltas through; holds back what could still be the start of a stop string.

    `feed` returns (text safe to emit now, whether a stop string ended the text).
    """

    def __init__(self, stop: tuple[str, ...] | list[str]):
        self.stop = tuple(stop)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        self.pending += delta
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = len(self.pending) - self._partial_match()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _partial_match(self) -> int:
        return held_back(self.pending, self.stop)

    def flush(self) -> str:
        """The held-back tail, once the stream ends without a stop string."""
        out, self.pending = self.pending, ""
        return out


def held_back(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that begins one of `tags` and is shorter than it:
    what a stream holds back until it is the whole tag or cannot become one."""
    longest = max((len(t) for t in tags), default=1) - 1
    for n in range(min(longest, len(text)), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def final_text(detok: IncrementalDetokenizer, stops: StopStringMatcher) -> str:
    """What an output that ended without a stop string still holds back: the detokenizer's
    unfinished character, then the matcher's possible start of a stop string."""
    return stops.feed(detok.flush())[0] + stops.flush()
