"""A preallocated key/value cache with one row ("slot") per running request.

Continuous batching needs requests to join and leave between decode steps. Transformers'
DynamicCache grows by concatenation, which copies the whole cache every step (a third of a decode
step's time on the embedded model at batch 8). Here each request owns one row of a buffer
[slots, kv_heads, capacity, head_dim] per layer and writes its new keys at its own length, in
place. Rows 0..B-1 always hold the running batch, so attention reads a view, never a copy.

The model sees this object as its `cache`: transformers' attention layers call only `update`.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_slots: int, max_len: int, initial_capacity: int = 256) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self._initial_capacity = min(initial_capacity, max_len)
        self.capacity = self._initial_capacity
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        # Set by `prepare_*` before each forward pass.
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._width = 0
        self._prefill = False

    # -- what the engine calls between forward passes -----------------------------------------

    def prepare_prefill(self, rows: list[int], length: int) -> None:
        """The next forward writes `length` tokens from column 0 into each of `rows`."""
        self._ensure_capacity(length)
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._prefill = True

    def prepare_decode(self, lengths: list[int]) -> None:
        """The next forward appends one token to rows 0..B-1, at column `lengths[i]` of row i."""
        self._width = max(lengths) + 1
        self._ensure_capacity(self._width)
        self._positions = torch.tensor(lengths, dtype=torch.long)
        self._rows = torch.arange(len(lengths))
        self._prefill = False

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copies the first `length` columns of row `source` into row `target` (compaction)."""
        for buffers in (self._keys, self._values):
            for buffer in buffers.values():
                buffer[target, :, :length] = buffer[source, :, :length]

    # -- what transformers' attention layers call ---------------------------------------------

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value: [B, kv_heads, T, head_dim]
        keys, values = self._buffers(layer_idx, key)
        rows = self._rows
        assert rows is not None and rows.numel() == key.shape[0], (
            "cache not prepared for this batch"
        )
        if self._prefill:
            t = key.shape[2]
            keys[rows, :, :t] = key
            values[rows, :, :t] = value
            # A new request attends only to its own prompt: no need to read the buffer back.
            return key, value
        keys[rows, :, self._positions] = key[:, :, 0]
        values[rows, :, self._positions] = value[:, :, 0]
        b = key.shape[0]
        return keys[:b, :, : self._width], values[:b, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    # -- storage ---------------------------------------------------------------------------------

    def _buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self._keys:
            shape = (self.num_slots, like.shape[1], self.capacity, like.shape[3])
            self._keys[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self._values[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._keys[layer_idx], self._values[layer_idx]

    def _ensure_capacity(self, needed: int) -> None:
        """Grows every buffer (doubling, up to max_len) so `needed` columns fit."""
        if needed > self.max_len:
            raise ValueError(f"{needed} tokens exceed the cache's maximum length {self.max_len}")
        if needed <= self.capacity:
            return
        new_capacity = self.capacity
        while new_capacity < needed:
            new_capacity = min(new_capacity * 2, self.max_len)
        for buffers in (self._keys, self._values):
            for layer_idx, old in buffers.items():
                grown = old.new_zeros((*old.shape[:2], new_capacity, old.shape[3]))
                grown[:, :, : self.capacity] = old
                buffers[layer_idx] = grown
        self.capacity = new_capacity

    def shrink(self) -> None:
        """Frees buffers that grew past their initial size (called when the engine goes idle).

        Buffers of the initial size are kept: reallocating them would cost every request that
        arrives at an idle server tens of milliseconds of time to first token.
        """
        if self.capacity > self._initial_capacity:
            self._keys.clear()
            self._values.clear()
            self.capacity = self._initial_capacity
