"""A non-streaming request whose client disconnects is cancelled, not finished for nobody."""

from __future__ import annotations

import asyncio

import pytest

from editserve.api.errors import ClientDisconnected
from editserve.api.wire import until_disconnect as _until_disconnect


class FakeRequest:
    def __init__(self, disconnect_after: float | None) -> None:
        self.disconnect_after = disconnect_after

    async def receive(self) -> dict:
        if self.disconnect_after is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.disconnect_after)
        return {"type": "http.disconnect"}


def test_work_is_cancelled_when_the_client_leaves() -> None:
    cancelled = asyncio.Event()

    async def slow_work() -> str:
        try:
            await asyncio.sleep(10)
            return "done"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def go() -> None:
        with pytest.raises(ClientDisconnected):
            await _until_disconnect(FakeRequest(0.05), slow_work())
        await asyncio.wait_for(cancelled.wait(), 1)

    asyncio.run(go())


def test_work_that_finishes_first_returns_its_result() -> None:
    async def quick() -> str:
        return "answer"

    assert asyncio.run(_until_disconnect(FakeRequest(None), quick())) == "answer"
