"""LocalHandle: the ingress's calls on a model in its own process, with Serve's handle semantics and a bounded
admission (no Ray: the methods are plain coroutines and async generators)."""

from __future__ import annotations

import asyncio

import pytest

from homefire.errors import Overloaded
from homefire.serve.local import LocalHandle


class Model:
    class cfg:
        name = "m"

    def __init__(self):
        self.closed = 0
        self.started = 0

    async def chat(self, n: int):
        self.started += 1
        try:
            for i in range(n):
                await asyncio.sleep(0.01)
                yield i
        finally:
            self.closed += 1

    def adapters(self):
        return ["x"]

    async def info(self, key):
        return {"key": key}


def _stream(handle, n=3):
    return handle.options(method_name="chat", stream=True).remote(n)


def test_streams_and_calls_behave_like_a_serve_handle():
    async def main():
        h = LocalHandle(Model(), max_requests=2)
        assert [x async for x in _stream(h)] == [0, 1, 2]
        assert await h.options(method_name="adapters").remote() == ["x"]
        assert await asyncio.wait_for(h.options(method_name="info").remote("k"), 1) == {"key": "k"}
        assert h.ongoing == 0

    asyncio.run(main())


def test_admission_is_bounded_and_every_way_out_frees_the_slot():
    async def main():
        model = Model()
        h = LocalHandle(model, max_requests=2)
        a, b = _stream(h, 100), _stream(h, 1)
        with pytest.raises(Overloaded) as err:
            _stream(h)
        assert err.value.status == 503 and err.value.retry_after_s and "model 'm' is at capacity" in err.value.message
        assert [x async for x in b] == [0]  # finished: its slot is free
        assert await a.__anext__() == 0
        a.cancel()  # the client went away between items: the generator is closed, the engine's request aborted
        a.cancel()  # twice is harmless
        await asyncio.sleep(0.05)
        assert h.ongoing == 0 and model.closed == 2
        c = _stream(h, 100)
        task = asyncio.ensure_future(c.__anext__())
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        task.cancel()  # cancelled while the model runs (a timeout): the task unwinds the generator
        c.cancel()
        await asyncio.sleep(0.05)
        assert h.ongoing == 0 and model.closed == 3
        never = _stream(h)
        never.cancel()  # refused by the ingress before it was iterated (a retry loop giving up)
        assert h.ongoing == 0

    asyncio.run(main())


def test_a_failing_stream_frees_its_slot():
    class Failing(Model):
        async def chat(self, n):
            yield 0
            raise RuntimeError("engine died")

    async def main():
        h = LocalHandle(Failing(), max_requests=1)
        s = _stream(h)
        assert await s.__anext__() == 0
        with pytest.raises(RuntimeError):
            await s.__anext__()
        assert h.ongoing == 0

    asyncio.run(main())
