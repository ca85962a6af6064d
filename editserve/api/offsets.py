"""Where each token starts in a completion's text: the legacy logprobs' `text_offset`.

A token's offset is the index (in characters of the returned text) of the first character its
bytes belong to. Byte-level tokenizers split a character such as an emoji, a CJK character or an
accented letter over several tokens; each of those reports where that character starts (as
OpenAI's API does), so offsets never decrease and a token counts as starting at or after a
point of the text exactly when its first byte lies there. Adding up each token's decoded length
instead counts every partial byte as one U+FFFD and drifts past the real text.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"  # what a decoder emits for a partial UTF-8 sequence


def encode_with_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[int], list[int] | None]:
    """`text`'s token ids and, from a fast tokenizer's offset mapping, each token's offset in
    `text` (None from a slow tokenizer, which has no mapping)."""
    if not tokenizer.is_fast:
        return tokenizer.encode(text), None
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets, end = [], 0
    for (start, stop), special in zip(
        enc["offset_mapping"], enc["special_tokens_mask"], strict=True
    ):
        # A special token the tokenizer adds (BOS, ...) maps to (0, 0): it sits where the text
        # before it ends.
        offsets.append(end if special and start == stop else start)
        end = max(end, stop)
    return list(enc["input_ids"]), offsets


class OffsetTracker:
    """Offsets of token ids decoded one at a time, for text that has no mapping: a prompt sent
    as ids, generated tokens. Decodes over a short window, as the engine's detokenizer does, so
    word-joining spaces come out as in a whole decode."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._context = 0  # window start: settled tokens kept as left context
        self._start = 0  # first token whose text has not settled
        self._base = ""  # the window's settled text (the context tokens')
        self._pending = ""  # text of the unsettled tokens, maybe ending in a partial character
        self.length = 0  # characters settled so far

    def add(self, token_id: int) -> int:
        """`token_id`'s offset; then takes it in."""
        offset = self.length + len(self._pending) - self._pending.endswith(_INCOMPLETE)
        self._ids.append(token_id)
        text = self._decode(self._ids[self._context :])[len(self._base) :]
        if text and not text.endswith(_INCOMPLETE):
            self.length += len(text)
            self._context, self._start = self._start, len(self._ids)
            self._base = self._decode(self._ids[self._context : self._start])
            self._pending = ""
        else:
            self._pending = text
        return offset

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def decoded_offsets(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], skip_special_tokens: bool = False
) -> list[int]:
    """Each token's offset in the decode of `ids`."""
    tracker = OffsetTracker(tokenizer, skip_special_tokens)
    return [tracker.add(t) for t in ids]


def generated_offsets(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str, base: int = 0
) -> list[int]:
    """Offsets of generated tokens whose text is `text` (special tokens and a stop string not
    in it), counted from `base`: where the generation starts in the returned text."""
    return [base + min(at, len(text)) for at in decoded_offsets(tokenizer, ids, True)]


@dataclass
class PromptText:
    """A completion prompt: its ids and, when it came as text, that text and its offsets."""

    ids: list[int]
    text: str | None = None
    offsets: list[int] | None = None  # each token's offset in `text` (fast tokenizers only)

    @classmethod
    def encode(cls, tokenizer: PreTrainedTokenizerBase, text: str) -> PromptText:
        ids, offsets = encode_with_offsets(tokenizer, text)
        return cls(ids, text, offsets)

    def echo(self, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
        """The prompt as a completion echoes it (as sent, when it came as text), and its
        tokens' offsets in that text."""
        if self.text is not None and self.offsets is not None:
            return self.text, self.offsets
        text = tokenizer.decode(self.ids, skip_special_tokens=False)
        return text, decoded_offsets(tokenizer, self.ids)
