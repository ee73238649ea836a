"""The API's own HTTP server, inside the ingress replica: the socket is read where the request is answered.

Behind Ray Serve's HTTP proxy every request and every streamed chunk is one more Ray message between two
processes; on a small box that hop costs as much CPU as the engine's own API server (see
``benchmarks/results/serve_profile.md``). So when Serve's proxy is disabled (``proxy_location: Disabled`` in a Serve
config, which is what ``homefire serve`` starts), the ingress replica listens on Serve's ``http_options`` address
itself, with uvicorn on its own event loop: ``homefire serve`` and ``serve run`` then take the same one-hop path.
When Serve's proxy is on (a cluster's ``EveryNode`` proxies), the replica leaves HTTP to it.

The socket is bound with ``SO_REUSEADDR`` (not ``SO_REUSEPORT``): a restart right after a stop binds again while
the previous run's connections linger in TIME-WAIT, and a port another server really listens on is still refused.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: How long a stopping server waits for open connections (in-flight requests were drained before).
STOP_TIMEOUT_S = 5.0
#: How long a starting server waits for its port (a redeploy's previous ingress replica may still hold it).
PORT_WAIT_S = 30.0


@dataclass(frozen=True)
class ListenAddress:
    """Where the ingress replica serves the API."""

    host: str
    port: int
    keep_alive_s: int = 5


async def own_http_address() -> ListenAddress | None:
    """Serve's ``http_options`` address when Serve runs no proxy (this replica is then the HTTP front); None when
    Serve's proxy serves HTTP, or outside a Serve replica."""
    try:
        from ray.serve.config import ProxyLocation
        from ray.serve.context import _get_global_client
    except ImportError:
        return None
    try:
        controller = _get_global_client()._controller
        http, location = await asyncio.gather(controller.get_http_config.remote(),
                                              controller.get_proxy_location.remote())
    except Exception as err:  # no Serve controller to ask (a test calling the class directly)
        logger.info("no Serve controller to read http_options from (%s): HTTP left to Serve", err)
        return None
    if location != ProxyLocation.Disabled:
        return None
    return ListenAddress(http.host, http.port, int(http.keep_alive_timeout_s))


def bind(addr: ListenAddress) -> socket.socket:
    """A listening socket on ``addr``; OSError naming the address and the fix when it is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr.host, addr.port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise OSError(
            f"the API cannot listen on {addr.host}:{addr.port} ({err.strerror}): another process holds the port. Fix: "
            "stop it, or set another port (http_options.port in a Serve config, --port for homefire serve)"
        ) from None
    sock.setblocking(False)
    return sock


async def bind_when_free(addr: ListenAddress, timeout_s: float = PORT_WAIT_S) -> socket.socket:
    """:func:`bind`, retried for up to ``timeout_s``: on a redeploy the replica that held the port is still
    draining when its successor starts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return bind(addr)
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.25)


class ApiServer:
    """uvicorn serving one ASGI app on an already bound socket, on the running event loop."""

    def __init__(self, app, sock: socket.socket, addr: ListenAddress):
        import uvicorn

        self.addr = addr
        self._sock = sock
        # uvicorn's error logger adds a message-logging middleware unless its level is set.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        config = uvicorn.Config(app, host=addr.host, port=addr.port, timeout_keep_alive=addr.keep_alive_s,
                                interface="asgi3", lifespan="off", access_log=False, log_level=None, log_config=None,
                                timeout_graceful_shutdown=STOP_TIMEOUT_S)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the replica's process owns its signals
        self._task: asyncio.Task | None = None

    def start(self, ready: asyncio.Future | None = None) -> None:
        """Accept connections once ``ready`` resolves (they queue in the socket's backlog until then)."""

        async def run():
            if ready is not None:
                await ready
            await self._server.serve(sockets=[self._sock])

        self._task = asyncio.get_running_loop().create_task(run())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the API server on %s:%d stopped", self.addr.host, self.addr.port, exc_info=task.exception())

    async def stop(self) -> None:
        """Stop listening, let open connections finish within STOP_TIMEOUT_S, close the socket."""
        if self._task is None:
            self._sock.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT_S + 1)
        except asyncio.TimeoutError:
            self._task.cancel()
        except Exception:  # the server had failed already; _ended logged why
            pass
        finally:
            self._sock.close()
