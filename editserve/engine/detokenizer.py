"""Turns generated token ids into text incrementally, and applies stop strings.

Decoding one token at a time breaks multi-byte characters and word-joining spaces, so text is
decoded over a short window of recent tokens and only the part that is settled is released.
Stop strings may span tokens: text that could still turn into a stop string is held back until
it can't (OpenAI's semantics: the stop string itself is not returned).
"""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"  # what a decoder emits for a partial UTF-8 sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start: context that makes the next decode join right
        self._read_offset = 0  # tokens already turned into text
        self.text = ""  # all settled text (stop string excluded once found)
        self._released = 0  # how much of self.text the caller has taken
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Adds one generated token; sets `stopped` when a stop string appears."""
        if self.stopped:
            return
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return  # no settled text yet: wait for the next token
        search_from = max(0, len(self.text) - self._holdback)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        found = [at for stop in self.stop if (at := self.text.find(stop, search_from)) != -1]
        if found:
            self.text = self.text[: min(found)]  # the earliest stop string wins
            self.stopped = True

    def release(self, final: bool) -> str:
        """The text not yet released, minus a tail that might still become a stop string."""
        end = len(self.text) if final or self.stopped else max(0, len(self.text) - self._holdback)
        end = max(end, self._released)
        piece = self.text[self._released : end]
        self._released = end
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
