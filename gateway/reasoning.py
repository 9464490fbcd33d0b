"""A reasoning model's thinking, split from its answer (`[gateway] reasoning_parser = "think"`):
an answer that opens with `<think>` thinks until `</think>`; that text is the message's
`reasoning_content`, the rest its `content`, and the thinking's tokens are counted in
`usage.completion_tokens_details.reasoning_tokens`. An answer that does not open with the tag
is all content. The split reads the text the gateway streams, so it is the same whichever
service sampled which token (the prefill's first one may open the tag).
"""

from dataclasses import dataclass

from baton.text import held_back

START, END = "<think>", "</think>"


@dataclass
class ReasoningStream:
    """One choice's text, piece by piece, into (reasoning, content) to send now; a partial
    tag is held back until it is whole or cannot be."""

    state: str = "opening"  # opening (the tag may still come), thinking, answering
    held: str = ""
    opened: bool = False  # it thought (else reasoning_content stays None)
    reasoning_tokens: int = 0

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning = ""
        self.reasoning_tokens += 1  # taken back if the answer does not open with the tag
        if self.state == "opening":
            if self.held.startswith(START):
                self.state, self.held = "thinking", self.held[len(START) :]
                self.opened = True
            elif not START.startswith(self.held):
                self.state, self.reasoning_tokens = "answering", 0
        elif self.state == "answering":
            self.reasoning_tokens -= 1
        if self.state == "thinking":
            if END in self.held:
                reasoning, self.held = self.held.split(END, 1)
                self.state = "answering"
            else:
                keep = held_back(self.held, (END,))
                reasoning, self.held = (
                    self.held[: len(self.held) - keep],
                    self.held[len(self.held) - keep :],
                )
        if self.state != "answering":
            return reasoning, ""
        content, self.held = self.held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held, as (reasoning, content), at the end of the answer."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "thinking" else ("", held)


def split(pieces: list[str]) -> tuple[str | None, str, int]:
    """A whole answer's (reasoning or None, content, reasoning tokens), from its pieces (one
    token's text each) as they streamed."""
    stream = ReasoningStream()
    parts = [stream.feed(p) for p in pieces] + [stream.finish()]
    reasoning = "".join(r for r, _ in parts) if stream.opened else None
    return reasoning, "".join(c for _, c in parts), stream.reasoning_tokens
