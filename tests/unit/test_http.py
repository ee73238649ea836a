"""The API's own HTTP server (serve/http.py): serves an ASGI app on a bound socket, stops, binds again at once."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from homefire.serve.http import ApiServer, ListenAddress, bind
from tests.helpers import free_port


async def _app(scope, receive, send):
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for part in (b"one ", b"two"):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _serve_once(addr: ListenAddress) -> tuple[int, str]:
    server = ApiServer(_app, bind(addr), addr)
    ready = asyncio.get_running_loop().create_future()
    server.start(ready)
    ready.set_result(None)
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://{addr.host}:{addr.port}/x")
        await server.stop()
    return r.status_code, r.text


def test_serves_streams_stops_and_binds_the_same_port_again_at_once():
    addr = ListenAddress("127.0.0.1", free_port())
    for _ in range(3):  # a restart right after a stop: the closed connections' TIME-WAIT must not block the bind
        assert asyncio.run(_serve_once(addr)) == (200, "one two")


def test_requests_wait_in_the_backlog_until_the_server_is_ready():
    async def main():
        addr = ListenAddress("127.0.0.1", free_port())
        server = ApiServer(_app, bind(addr), addr)
        ready = asyncio.get_running_loop().create_future()
        server.start(ready)
        async with httpx.AsyncClient() as client:
            pending = asyncio.ensure_future(client.get(f"http://127.0.0.1:{addr.port}/", timeout=10))
            await asyncio.sleep(0.3)
            assert not pending.done()  # connected, not answered: the instance is not registered yet
            ready.set_result(None)
            r = await pending
        await server.stop()
        return r.text

    assert asyncio.run(main()) == "one two"


def test_a_port_another_server_listens_on_is_refused_naming_it_and_the_fix():
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError) as err:
            bind(ListenAddress("127.0.0.1", port))
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "http_options.port" in msg and "--port" in msg


def test_a_port_freed_within_the_wait_is_taken_a_port_held_longer_is_refused():
    from homefire.serve.http import bind_when_free

    async def main(hold_s: float, wait_s: float):
        other = socket.socket()
        other.bind(("127.0.0.1", 0))
        other.listen()
        addr = ListenAddress("127.0.0.1", other.getsockname()[1])
        asyncio.get_running_loop().call_later(hold_s, other.close)  # the previous replica exits
        try:
            sock = await bind_when_free(addr, wait_s)
        finally:
            other.close()
        sock.close()

    asyncio.run(main(hold_s=0.5, wait_s=5))
    with pytest.raises(OSError, match="another process holds the port"):
        asyncio.run(main(hold_s=3, wait_s=0.5))
