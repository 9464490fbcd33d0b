"""Incremental detokenization and stop strings, with the real SmolLM2 tokenizer."""

import pytest
from transformers import AutoTokenizer

from baton.text import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "Héllo wörld, ça va? 日本語のテキスト 🎉🚀 done.",
    "  leading spaces\n\tand tabs",
    "ünïcödé",
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_join_to_the_full_decode_without_broken_characters(tok, text):
    prompt = tok.encode("Say it:")
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    # multi-byte emoji span several byte-level tokens: some steps must emit nothing
    if "🎉" in text:
        assert "" in pieces


def test_an_output_cut_inside_a_character_ends_as_the_full_decode_does(tok):
    # max_tokens can end the output between an emoji's byte-level tokens: its bytes so far
    # come out as U+FFFD, as a full decode of the ids writes them, not silently dropped
    ids = tok.encode("ok 🎉")
    detok = IncrementalDetokenizer(tok, tok.encode("Say it:"))
    for cut in range(1, len(ids)):
        if tok.decode(ids[:cut]).endswith("\ufffd"):
            break
    else:
        pytest.fail("no token boundary inside the emoji")
    pieces = [detok.add(t) for t in ids[:cut]]
    assert "".join(pieces) + detok.flush() == tok.decode(ids[:cut])
    assert detok.flush() == ""  # once


def test_stop_string_split_across_deltas_is_cut_and_not_returned():
    m = StopStringMatcher(["STOP", "end"])
    out = []
    for delta in ["Hello ", "wor", "ld ST", "O", "P and more"]:
        text, stopped = m.feed(delta)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello world " and stopped


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abcST") == ("abc", False)  # "ST" could still become "STOP"
    assert m.feed("O") == ("", False)
    assert m.feed("X") == ("STOX", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"
    assert StopStringMatcher([]).feed("anything") == ("anything", False)
