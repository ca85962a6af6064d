"""Incremental detokenization: multi-byte characters, stop strings across tokens, hold-back."""

from __future__ import annotations

from editserve.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import byte_tokenizer


def feed(text: str, stop: tuple[str, ...] = ()) -> tuple[IncrementalDetokenizer, list[str]]:
    tokenizer = byte_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in tokenizer.encode(text):
        detok.add(token)
        pieces.append(detok.release(final=False))
        if detok.stopped:
            break
    pieces.append(detok.release(final=True))
    return detok, pieces


def test_multibyte_characters_are_never_split() -> None:
    text = "naïve café — 東京 🙂"
    detok, pieces = feed(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_spanning_tokens_is_cut_and_not_returned() -> None:
    detok, pieces = feed("The answer is 42. END of story", stop=("END",))
    assert detok.stopped
    assert "".join(pieces) == "The answer is 42. "


def test_text_that_may_become_a_stop_string_is_held_back() -> None:
    tokenizer = byte_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, ("STOP",))
    released = ""
    for token in tokenizer.encode("abcST"):
        detok.add(token)
        released += detok.release(final=False)
    assert released == "ab"  # "cST" could still begin "STOP"... only "ST" can, keep 3 chars back
    assert released + detok.release(final=True) == "abcST"


def test_earliest_stop_string_wins() -> None:
    detok, pieces = feed("one two three", stop=("three", "two"))
    assert "".join(pieces) == "one "
