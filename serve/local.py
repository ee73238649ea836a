"""A model served inside the ingress's own replica: one hop from HTTP to the engine.

With one model on one replica, a separate ingress replica costs a Ray message per streamed item on both sides of the
hop, on the same cores the engine needs (on a 2-core box that hop took as much CPU as vLLM's whole API server).
:class:`LocalHandle` lets the ingress call a :class:`~homefire.serve.server.ModelServer` that lives in its own
process with the calls it makes on a Serve ``DeploymentHandle``, so routing, auth, metrics, retries and drain are the
same code in both layouts. Admission is bounded here (Serve's router does it for a separate model deployment):
past ``max_requests`` running or waiting, a request is refused at once with ``Overloaded`` (503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

from homefire.errors import Overloaded


class LocalHandle:
    """``handle.options(method_name=..., stream=...).remote(*args)`` on an object in this process."""

    def __init__(self, server: Any, max_requests: int):
        self.server = server
        self.max_requests = max_requests
        self.ongoing = 0

    def options(self, *, method_name: str, stream: bool = False) -> _LocalCall:
        return _LocalCall(self, method_name, stream)


class _LocalCall:
    def __init__(self, handle: LocalHandle, method_name: str, stream: bool):
        self.handle, self.method_name, self.stream = handle, method_name, stream

    def remote(self, *args: Any) -> Any:
        method = getattr(self.handle.server, self.method_name)
        if not self.stream:
            return _call(method, args)
        h = self.handle
        if h.ongoing >= h.max_requests:
            raise Overloaded(
                f"model '{h.server.cfg.name}' is at capacity ({h.max_requests} requests running or waiting); retry after the "
                "Retry-After seconds", code="overloaded",
            )
        h.ongoing += 1
        return LocalStream(method(*args), h)


async def _call(method, args: tuple) -> Any:
    result = method(*args)
    return await result if inspect.isawaitable(result) else result


class LocalStream:
    """An async generator with the ``cancel()`` of Serve's response generator; holds one admission slot until it
    ends, fails or is cancelled."""

    def __init__(self, agen: AsyncIterator, handle: LocalHandle):
        self._agen = agen
        self._handle = handle
        self._held = True
        self._closing: asyncio.Task | None = None

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._agen.__anext__()
        except BaseException:  # the end (StopAsyncIteration), a failure or a cancellation: the slot is free
            self._release()
            raise

    def cancel(self) -> None:
        """Stop the request: closing the generator aborts the engine's request (its ``finally``). A generator still
        running belongs to a task being cancelled, which unwinds it."""
        self._release()
        if not self._agen.ag_running and self._closing is None:
            self._closing = asyncio.ensure_future(self._agen.aclose())

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._handle.ongoing -= 1
