"""``homefire serve``'s runtime: start Ray and the app, wait until it serves, drain and stop on a signal.

What a process manager expects of a server (systemd, Docker, Kubernetes stop with SIGTERM, a terminal with
Ctrl-C): a start that fails fast and says why (a busy port is named with its owner before Ray starts; a failed
deployment prints the replica's own exception), and a stop that refuses new requests, lets the ones in flight
finish within ``server.drain_timeout_s``, leaves no Ray or engine process behind, frees the port, and exits 0.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from homefire import __version__, constants
from homefire.errors import ConfigError

#: A port still held by a previous run (its Ray workers exiting) is waited for this long.
PORT_RELEASE_WAIT_S = 30.0


@dataclass
class ServeOptions:
    """What ``homefire serve`` was asked for (CLI flags over the config)."""

    config: str | None = None
    host: str | None = None
    port: int | None = None
    proxy: str | None = None
    address: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    detach: bool = False
    verbose: bool = False


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- ports
def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound the way the API server binds it (:func:`homefire.serve.http.bind`,
    SO_REUSEADDR: a previous run's closing connections do not count, a listener does)."""
    from homefire.serve.http import ListenAddress, bind

    try:
        bind(ListenAddress(host, port)).close()
    except OSError:
        return True
    return False


def port_holder(port: int) -> tuple[int | None, str]:
    """(pid, command line) of the process listening on ``port``; (None, "") when nobody listens on it."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None, "another process"
    for c in conns:
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN:
            try:
                return c.pid, " ".join(psutil.Process(c.pid).cmdline())[:120] if c.pid else "another user's process"
            except psutil.Error:
                return c.pid, "?"
    return None, ""


def wait_port_free(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while port_in_use(host, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def check_port(host: str, port: int) -> None:
    """ConfigError naming the process that listens on ``host:port`` and the fix. A port that a Ray worker of a
    previous run is still releasing (or that no listener holds) is waited for."""
    if not port_in_use(host, port):
        return
    pid, cmd = port_holder(port)
    if pid is None and not cmd or cmd.startswith("ray::"):
        _say(f"  port {port} is still held by a previous run; waiting for it (up to {PORT_RELEASE_WAIT_S:.0f}s) ...")
        if wait_port_free(host, port, PORT_RELEASE_WAIT_S):
            return
        pid, cmd = port_holder(port)
    who = f"pid {pid} ({cmd})" if pid else cmd or "connections the kernel keeps open"
    raise ConfigError(
        f"port {port} on {host} is in use by {who}. Fix: stop that process, or serve on another port with "
        f"--port {port + 10} (or server.port in the config)"
    )


def local_cpus(cfg) -> float:
    """Enough logical CPUs for every initial replica plus the ingress, never less than the machine has."""
    need = cfg.server.ingress_cpus * cfg.server.ingress_replicas + 1
    for mdl in cfg.models:
        a = mdl.autoscaling
        n = mdl.replicas or (a.initial_replicas if a and a.initial_replicas is not None else a.min_replicas if a else 1)
        need += mdl.cpus * n
    return float(max(os.cpu_count() or 1, math.ceil(need)))


# ---------------------------------------------------------------------------------------------- run
def serve_forever(opts: ServeOptions) -> int:
    """Deploy the config's app and block until a signal; 0 after a clean drain and stop, 1 when it never started."""
    from homefire.serve.builders import DEFAULT_CONFIG, app_config_from_file, build_app, serve_http_options

    path = opts.config or str(DEFAULT_CONFIG)
    cfg = app_config_from_file(path)  # a bad config fails here, before Ray starts
    http = serve_http_options(path)
    host = opts.host or http.get("host") or cfg.server.host
    port = opts.port or http.get("port") or cfg.server.port
    proxy = opts.proxy or cfg.server.proxy
    if proxy == "direct" and cfg.server.ingress_replicas != 1:
        raise ConfigError("--proxy direct needs server.ingress_replicas: 1. Fix: use --proxy serve")
    if not opts.address:
        check_port(host, port)

    import ray
    from ray import serve

    stop = threading.Event()
    proxy_location = None  # Serve's default (a proxy on every node), or what a running cluster has
    _say(f"homefire {__version__}: starting Ray ...")
    quiet = not opts.verbose
    if quiet:  # homefire's own lines on the terminal; Ray's and the engines' go to the session's log files
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    init = dict(log_to_driver=opts.verbose, logging_level=logging.WARNING if quiet else logging.INFO)
    if opts.address:
        if opts.proxy:
            _say("note: --proxy only applies when homefire starts Ray; a running cluster keeps its own")
        ray.init(address=opts.address, **init)
    else:
        # Read by every Serve process at import: set before Ray starts so they all inherit it.
        if proxy == "direct":
            # No Serve proxy: the ingress replica serves the API port itself (homefire.serve.http), as under
            # `serve run` with `proxy_location: Disabled`. Not RAY_SERVE_THROUGHPUT_OPTIMIZED: it runs user code on
            # the replica's Ray loop, and the API's server with it, which measured 0.67-0.73 of bare vLLM against
            # 0.90-0.94 on a loop of its own (benchmarks/results/serve_profile.md).
            proxy_location = "Disabled"
        elif proxy == "haproxy":
            os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        # Serve's controller reconciles every 0.1 s by default: 3.7 % of a core (and 1.7 % in the GCS it calls)
        # on an idle 2-core box, where the engine needs ~1.7 cores; 0.5 s halves both (1.8 % and 1.0 %,
        # benchmarks/cpu_by_process.py, serve_profile.md) and still reacts within a second.
        os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
        # address="local": a Ray of its own, even where `ray start` left one running (--address joins that one).
        ray.init(address="local", num_cpus=opts.num_cpus or local_cpus(cfg), num_gpus=opts.num_gpus,
                 dashboard_host="127.0.0.1", **init)
    # After ray.init, which installs its own SIGTERM handler (sys.exit): a signal at any point from here on,
    # even while deploying, ends in a drain and an orderly stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    if quiet:
        _say(f"  Ray, Serve and engine logs: {logs}  (--verbose prints them here)")
    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
    args = cfg.model_dump(mode="json")
    args["server"]["api_keys"] = [k.get_secret_value() for k in cfg.server.api_keys]
    names = ", ".join(m.name for m in cfg.models)
    _say(f"deploying {names} (engines take ~30-60 s each on CPU) ...")
    t0 = time.time()
    serve._run(build_app(args), _blocking=False, name=constants.SERVE_APP_NAME, route_prefix="/")
    if not _wait_until_running(constants.SERVE_APP_NAME, constants.SERVE_START_TIMEOUT_S, stop, logs):
        # Stopped while starting: an app that already serves (some replicas up) still finishes what it holds.
        _shutdown(opts.address is not None, host, port, cfg.server.drain_timeout_s if stop.is_set() else 0.0)
        return 0 if stop.is_set() else 1
    _say(f"ready in {time.time() - t0:.0f}s: http://{host}:{port}/v1  (models: {names})")
    _say(f"  try: curl http://{host}:{port}/v1/models    status: homefire status    stop: Ctrl-C or SIGTERM")
    if opts.detach:
        return 0
    stop.wait()
    _shutdown(opts.address is not None, host, port, cfg.server.drain_timeout_s)
    return 0


def drain(app: str, timeout_s: float) -> int:
    """Tell the ingress to refuse new requests, then wait up to ``timeout_s`` for those in flight; returns how many
    were still running when the wait ended."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or not any((d.replica_states or {}).get("RUNNING") for d in status.deployments.values()):
        return 0  # nothing was served yet
    handle = serve.get_app_handle(app)  # the ingress (a separate deployment, or the model's own with_model)
    left = handle.drain.remote().result(timeout_s=10)
    if left:
        _say(f"draining: waiting up to {timeout_s:.0f}s for {left} request(s) in flight ...")
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = handle.in_flight.remote().result(timeout_s=10)
    return left


def _shutdown(remote: bool, host: str, port: int, drain_timeout_s: float) -> None:
    """Drain, then delete the app (on a cluster) or stop Serve and the local Ray this command started."""
    import ray
    from ray import serve

    # A second signal while stopping is not an emergency exit: the stop is already under way and bounded.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    _say("shutting down: refusing new requests ...")
    if drain_timeout_s > 0:
        try:
            left = drain(constants.SERVE_APP_NAME, drain_timeout_s)
            _say("  every request in flight finished" if not left else f"  {left} request(s) cut off after "
                 f"{drain_timeout_s:.0f}s (server.drain_timeout_s)")
        except Exception as err:  # an app that never started has no ingress to drain
            _say(f"  nothing to drain ({type(err).__name__})")
    try:
        # Deleting the app stops its replicas gracefully (engines shut down, ports closed); on a local Ray, what
        # is left (the controller, Ray itself) goes with ray.shutdown.
        serve.delete(constants.SERVE_APP_NAME)
    except Exception as err:  # Ray's own processes may be gone already
        _say(f"note: Serve did not shut down cleanly ({type(err).__name__}: {err}); stopping Ray")
    finally:
        ray.shutdown()
    if not remote:  # the API's listener goes with the ingress replica's process
        deadline = time.monotonic() + 15
        while port_holder(port)[0] is not None and time.monotonic() < deadline:
            time.sleep(0.25)
    _say("stopped")


def _wait_until_running(app: str, timeout_s: float, stop: threading.Event, logs: Path) -> bool:
    """Poll the app until it runs; print progress lines; False on failure or timeout (bounded wait)."""
    from homefire.serve.status import app_status, format_status

    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline and not stop.is_set():
        st = app_status(app)
        if st["status"] == "RUNNING":
            return True
        if st["status"] == "DEPLOY_FAILED":
            print(format_status(st, detail=True), file=sys.stderr)
            cause = last_exception(logs)
            if cause:
                print(f"\nthe cause, from Serve's controller log ({logs / 'serve'}):\n{cause}", file=sys.stderr)
            return False
        line = ", ".join(
            f"{d.get('model') or n}: {d['running']} running/{d['starting']} starting/{d['pending']} pending"
            for n, d in st["deployments"].items()
        )
        if line != last:
            _say(f"  [{time.time() - deadline + timeout_s:5.0f}s] {line or st['status']}")
            last = line
        stop.wait(2)
    if stop.is_set():
        return False
    print(f"the app did not start within {timeout_s:.0f}s (HOMEFIRE_SERVE_START_TIMEOUT_S):", file=sys.stderr)
    print(format_status(app_status(app), detail=True), file=sys.stderr)
    return False


def last_exception(logs: Path, lines: int = 12) -> str:
    """The last traceback Serve's controller logged (where a failed deployment's cause ends up), trimmed."""
    found: list[str] = []
    for log in sorted((logs / "serve").glob("controller_*.log"), key=lambda p: p.stat().st_mtime):
        text = log.read_text(errors="replace").splitlines()
        starts = [i for i, t in enumerate(text) if "Traceback (most recent call last)" in t]
        if not starts:
            continue
        found = text[starts[-1]:starts[-1] + 1]
        for t in text[starts[-1] + 1:]:
            found.append(t)
            if t and not t[0].isspace():  # the exception's own line ends the traceback
                break
    if len(found) > lines:
        found = ["..."] + found[-lines:]
    return "\n".join(f"  {t}" for t in found)
