"""What the engine admits: the context window, max_tokens, the KV-cache budget, the queue.

Checked when a call is submitted, so a request that could never run is refused at once (400)
and one that finds the queue full is told to come back (429); the API maps the two exceptions
to their HTTP status (api/errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass


class QueueFull(Exception):
    """The waiting queue is at its limit (429 with Retry-After)."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        super().__init__(
            f"the server is busy: {limit} generations are waiting already "
            f"(EDITSERVE_MAX_WAITING); retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class RequestTooLarge(ValueError):
    """The call could never be admitted, however long it waited (400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    kv_budget_tokens: int  # KV-cache cells (one token of one row) the batch may use together
    max_waiting: int = 256  # generations queued at most
    default_max_tokens: int = 1024  # a request that names none
    max_tokens_limit: int | None = None  # a larger max_tokens is refused

    def worst_case(self, prompt_tokens: int, max_tokens: int) -> int:
        """The cache columns a request may reach: its prompt and every token it may generate."""
        return min(prompt_tokens + max_tokens, self.max_model_len)

    def completion_budget(self, prompt_tokens: int, requested: int | None) -> int:
        """max_tokens for a request: as asked, else `default_max_tokens` (or what the context
        leaves, if less). `check_length` then says whether it is allowed."""
        if requested is not None:
            return requested
        return max(min(self.default_max_tokens, self.max_model_len - prompt_tokens), 0)

    def check_length(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """A person-readable reason the request can't fit the context window, the max_tokens
        limit or the KV-cache budget, or None."""
        if prompt_tokens == 0:
            return "the prompt is empty"
        total = prompt_tokens + max_tokens
        if total > self.max_model_len:
            return (
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"asks for {total} ({prompt_tokens} in the prompt, {max_tokens} to generate)"
            )
        if self.max_tokens_limit is not None and max_tokens > self.max_tokens_limit:
            return (
                f"max_tokens is {max_tokens}; this server generates at most "
                f"{self.max_tokens_limit} tokens per request (EDITSERVE_MAX_TOKENS_LIMIT)"
            )
        if total > self.kv_budget_tokens:
            return (
                f"the request needs {total} tokens of KV cache ({prompt_tokens} in the prompt, "
                f"{max_tokens} to generate); this server's KV-cache budget holds "
                f"{self.kv_budget_tokens} (EDITSERVE_KV_CACHE_MB)"
            )
        return None

    def check_call(self, sizes: list[tuple[int, int]], waiting: int, first: bool) -> None:
        """Refuses a call ((prompt tokens, max_tokens) per generation) that could never be
        admitted whole (RequestTooLarge), or that finds the queue full (QueueFull). An empty
        queue takes any call, so none waits forever; a call re-queued `first` is never refused.
        """
        columns = max(self.worst_case(p, m) for p, m in sizes)
        if len(sizes) * columns > self.kv_budget_tokens:
            raise RequestTooLarge(
                f"{len(sizes)} generations of up to {columns} tokens need "
                f"{len(sizes) * columns} tokens of KV cache together; this server's KV-cache "
                f"budget holds {self.kv_budget_tokens} (EDITSERVE_KV_CACHE_MB): ask for fewer "
                "choices or fewer max_tokens",
                param="max_tokens",
            )
        if not first and waiting and waiting + len(sizes) > self.max_waiting:
            raise QueueFull(self.max_waiting)
