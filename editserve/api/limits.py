"""Request limits: a cap on body size (413) and a per-key rate limit on edit routes (429)."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from editserve.api.errors import APIError, error_body


class BodyLimit:
    """Refuses bodies over `max_bytes` with a 413, before they are parsed (or buffered whole).

    The declared Content-Length is checked first; a chunked body is counted as it arrives: past
    the limit the app is told the body ended, and whatever it answers is replaced by the 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen, exceeded, refused = 0, False, False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def replacing_send(message: Message) -> None:
            nonlocal refused
            if not exceeded:
                await send(message)
            elif not refused:
                refused = True
                await self._refuse(send)

        await self.app(scope, counting_receive, replacing_send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                f"the request body is larger than this server accepts ({self.max_bytes} bytes; "
                "EDITSERVE_MAX_REQUEST_BYTES)",
                "invalid_request_error",
                code="request_too_large",
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute, bursts up to that many.

    The caller is the Bearer key (hashed: no key kept in memory in clear), else the client
    address."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:  # noqa: ANN001
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last time)
        self._lock = threading.Lock()

    def take(self, caller: str) -> float:
        """0 when the request may go ahead, else the seconds to wait for the next token."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(caller, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate

    def check(self, request: Request) -> None:
        wait = self.take(caller_of(request))
        if wait > 0:
            raise APIError(
                429,
                f"too many edit requests from this key; retry in {math.ceil(wait)} s "
                f"(limit {round(self.capacity)} a minute, EDITSERVE_EDIT_RATE_PER_MINUTE)",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"retry-after": str(math.ceil(wait))},
            )


def caller_of(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header:
        return "key:" + hashlib.sha256(header.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "?")
