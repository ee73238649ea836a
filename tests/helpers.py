"""Test helpers: a local Ray + Serve on a free loopback port."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_service_port() -> int:
    """A free port below the kernel's ephemeral range, like 8000: outgoing connections never take it as their local
    port, so a server can be stopped and started on it again and again."""
    import random

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for port in random.sample(range(20_000, min(low, 32_000)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class ServeCluster:
    """A local Ray with Serve on a free loopback port.

    ``proxy_location="Disabled"`` is what ``homefire serve`` runs: no Serve proxy, the app's ingress replica listens
    on the port itself (one app per port). The default keeps Serve's proxy in front (several apps by route prefix).
    """

    def __init__(self, num_cpus: float, num_gpus: float | None = None, proxy_location: str | None = None):
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", logging_level="WARNING", log_to_driver=False)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, proxy_location=proxy_location)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def deploy(self, args: dict, name: str = "homefire", wait: bool = True):
        from ray import serve

        from homefire.serve import build_app

        serve._run(build_app(args), _blocking=wait, name=name, route_prefix="/")

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
