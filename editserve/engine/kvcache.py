"""A preallocated key/value cache with one row ("slot") per running request.

Continuous batching needs requests to join and leave between decode steps. Transformers'
DynamicCache grows by concatenation, which copies the whole cache every step (a third of a decode
step's time on the embedded model at batch 8). Here each request owns one row of a buffer
[slots, kv_heads, capacity, head_dim] per layer and writes its new keys at its own length, in
place. Rows 0..B-1 always hold the running batch, so attention reads a view, never a copy.

The buffer is a rectangle: every row has the capacity of the longest. Its rows x columns never
exceed `budget_tokens` (EDITSERVE_KV_CACHE_MB): when a long request needs more columns, the buffer
is reallocated with fewer spare rows. The engine admits a request only if every running request
can reach its worst case (prompt + max_tokens) within the budget, so growth never fails mid-way.

The model sees this object as its `cache`: transformers' attention layers call only `update`.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes one token's keys and values take in one row, over every layer."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = next(model.parameters()).dtype.itemsize
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def default_kv_cache_bytes(
    bytes_per_token: int, max_batch: int, max_len: int, device: torch.device
) -> int:
    """Room for max_batch requests of 2048 tokens (or of the context, if shorter), at most a
    quarter of the device's memory, never less than one request of the whole context, and never
    more than every row at the whole context (the most the engine can use)."""
    full = max_batch * max_len * bytes_per_token
    typical = max_batch * min(max_len, 2048) * bytes_per_token
    memory = _device_memory(device)
    ceiling = memory // 4 if memory else typical
    return min(full, max(max_len * bytes_per_token, min(typical, ceiling)))


def _device_memory(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


class SlotKVCache:
    def __init__(
        self,
        num_slots: int,
        max_len: int,
        initial_capacity: int = 256,
        budget_tokens: int | None = None,
    ) -> None:
        self.num_slots = num_slots  # the most rows ever needed (the batch size)
        self.max_len = max_len
        # rows x capacity never exceeds this; None: every row may reach max_len
        self.budget_tokens = max(budget_tokens or num_slots * max_len, 1)
        capacity = min(initial_capacity, max_len, self.budget_tokens)
        self._initial = (min(num_slots, self.budget_tokens // capacity), capacity)
        self.rows, self.capacity = self._initial
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        # Set by `prepare_*` before each forward pass.
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._width = 0
        self._prefill = False

    # -- what the engine calls between forward passes -----------------------------------------

    def prepare_prefill(self, rows: list[int], length: int, in_use: int = 0) -> None:
        """The next forward writes `length` tokens from column 0 into each of `rows`, which follow
        the rows already holding requests (whose first `in_use` columns are kept)."""
        self._ensure_room(max(rows) + 1, max(length, in_use), keep=min(rows))
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._prefill = True

    def prepare_decode(self, lengths: list[int]) -> None:
        """The next forward appends one token to rows 0..B-1, at column `lengths[i]` of row i."""
        self._width = max(lengths) + 1
        self._ensure_room(len(lengths), self._width, keep=len(lengths))
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
            shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
            self._keys[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self._values[layer_idx] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._keys[layer_idx], self._values[layer_idx]

    def allocated_bytes(self) -> int:
        buffers = (*self._keys.values(), *self._values.values())
        return sum(b.numel() * b.element_size() for b in buffers)

    def _ensure_room(self, rows: int, columns: int, keep: int) -> None:
        """Reallocates so `rows` rows of `columns` fit, within the budget; rows 0..keep-1 are
        kept. Columns grow by doubling (up to max_len), and spare rows give way to columns."""
        if rows <= self.rows and columns <= self.capacity:
            return
        if columns > self.max_len:
            raise ValueError(f"{columns} tokens exceed the cache's maximum length {self.max_len}")
        if rows * columns > self.budget_tokens or rows > self.num_slots:
            raise ValueError(
                f"{rows} rows of {columns} tokens exceed the KV-cache budget of "
                f"{self.budget_tokens} tokens"
            )
        new_columns = self.capacity
        while new_columns < columns:
            new_columns = min(new_columns * 2, self.max_len)
        new_columns = max(columns, min(new_columns, self.budget_tokens // rows))
        grown_rows = min(self.num_slots, max(rows, 2 * self.rows))  # rows double too
        wanted_rows = self.rows if rows <= self.rows else grown_rows
        new_rows = max(rows, min(wanted_rows, self.budget_tokens // new_columns))
        kept_rows, kept_columns = min(keep, new_rows), min(self.capacity, new_columns)
        for buffers in (self._keys, self._values):
            for layer_idx, old in buffers.items():  # one layer at a time: old memory goes as we go
                grown = old.new_zeros((new_rows, old.shape[1], new_columns, old.shape[3]))
                grown[:kept_rows, :, :kept_columns] = old[:kept_rows, :, :kept_columns]
                buffers[layer_idx] = grown
        self.rows, self.capacity = new_rows, new_columns

    def shrink(self) -> None:
        """Frees buffers reshaped from their initial size (called when the engine goes idle).

        Buffers of the initial size are kept: reallocating them would cost every request that
        arrives at an idle server tens of milliseconds of time to first token.
        """
        if (self.rows, self.capacity) != self._initial:
            self._keys.clear()
            self._values.clear()
            self.rows, self.capacity = self._initial
