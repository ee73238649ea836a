"""The ``homefire`` command. Importing this module imports neither torch, vllm nor ray.

    homefire serve [CONFIG]      serve models behind an OpenAI-compatible API (default: the offline demo)
    homefire status              replicas running / starting / pending per model
    homefire models build|list   build the offline demo models; list the registry
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Literal

from homefire import __version__, constants
from homefire.errors import ConfigError, HomefireError


def _flags_from_model(parser: argparse.ArgumentParser, model: type, fields: list[str]) -> None:
    """Add ``--field`` flags whose help and type come from the config model (defaults stay there)."""
    for name in fields:
        f = model.model_fields[name]
        choices = getattr(f.annotation, "__args__", None) if getattr(f.annotation, "__origin__", None) is Literal else None
        ann = f.annotation if f.annotation in (int, float, str) else str
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=ann, default=None, choices=choices,
            help=f"{f.description} (default: {f.default})",
        )


def _build_parser() -> argparse.ArgumentParser:
    from homefire.serve.config import ServerConfig

    p = argparse.ArgumentParser(
        prog="homefire",
        description="Run your own LLMs on your own hardware, on Ray: serve, train, tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  homefire serve                         # offline demo models on http://127.0.0.1:8000\n"
        "  homefire serve serve/configs/gpu-fractional.yaml --host 0.0.0.0\n  homefire status",
    )
    p.add_argument("--version", action="version", version=f"homefire {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve", help="serve models behind an OpenAI-compatible API",
        description="Start (or connect to) Ray and deploy the serve app. With no CONFIG, serves the embedded "
        "default: two offline demo models on the vLLM engine. CONFIG is a homefire serve YAML or a Serve config "
        "whose application runs homefire.serve:build_app. Blocks until Ctrl-C.",
    )
    s.add_argument("config", nargs="?", help="serve YAML (default: the embedded demo config)")
    _flags_from_model(s, ServerConfig, ["host", "port", "proxy"])
    s.add_argument("--address", help="Ray cluster to deploy to (e.g. 'auto'); default: start a local Ray")
    s.add_argument("--num-cpus", type=float, help="logical CPUs for a local Ray (default: enough for the config)")
    s.add_argument("--num-gpus", type=float, help="logical GPUs for a local Ray (default: detected)")
    s.add_argument("--detach", action="store_true", help="return once the app is ready, leaving it running")

    st = sub.add_parser("status", help="replicas running, starting and pending per model")
    st.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    st.add_argument("--app", default=constants.SERVE_APP_NAME, help="Serve application name")
    st.add_argument("--json", action="store_true", help="print JSON")

    m = sub.add_parser("models", help="build the offline demo models; list the registry")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    b = msub.add_parser("build", help="build offline models (default: all demo models), cached by recipe")
    b.add_argument("names", nargs="*", help="demo model names (default: all)")
    msub.add_parser("list", help="list registry entries")
    return p


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _local_cpus(cfg) -> float:
    """Enough logical CPUs for every initial replica plus the ingress, never less than the machine has."""
    need = cfg.server.ingress_cpus * cfg.server.ingress_replicas + 1
    for mdl in cfg.models:
        a = mdl.autoscaling
        n = mdl.replicas or (a.initial_replicas if a and a.initial_replicas is not None else a.min_replicas if a else 1)
        need += mdl.cpus * n
    return float(max(os.cpu_count() or 1, math.ceil(need)))


def cmd_serve(args: argparse.Namespace) -> int:
    from homefire.serve.builders import DEFAULT_CONFIG, app_config_from_file, build_app, serve_http_options

    path = args.config or str(DEFAULT_CONFIG)
    cfg = app_config_from_file(path)  # a bad config fails here, before Ray starts
    http = serve_http_options(path)
    host = args.host or http.get("host") or cfg.server.host
    port = args.port or http.get("port") or cfg.server.port

    import ray
    from ray import serve

    # Ctrl-C / SIGTERM at any point (even while deploying) ends in an orderly shutdown, never a traceback.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    proxy = args.proxy or cfg.server.proxy
    if proxy == "direct" and cfg.server.ingress_replicas != 1:
        raise ConfigError("--proxy direct needs server.ingress_replicas: 1. Fix: use --proxy serve")
    serve_port = port
    print(f"homefire {__version__}: starting Ray ...", flush=True)
    if args.address:
        if args.proxy:
            print("note: --proxy only applies when homefire starts Ray; a running cluster keeps its own", flush=True)
        ray.init(address=args.address)
    else:
        # Read by every Serve process at import: set before Ray starts so they all inherit it.
        if proxy == "direct":
            # The ingress replica binds the API port itself; Serve's own proxy moves to a spare loopback port.
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
            os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
            os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
            serve_port = _free_port(host)
        elif proxy == "haproxy":
            os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        ray.init(num_cpus=args.num_cpus or _local_cpus(cfg), num_gpus=args.num_gpus, dashboard_host="127.0.0.1")
    serve.start(http_options={"host": host, "port": serve_port})
    args_dict = cfg.model_dump(mode="json")
    args_dict["server"]["api_keys"] = [k.get_secret_value() for k in cfg.server.api_keys]
    print(f"deploying {', '.join(m.name for m in cfg.models)} (engines take ~30-60 s each on CPU) ...", flush=True)
    t0 = time.time()
    serve._run(build_app(args_dict), _blocking=False, name=constants.SERVE_APP_NAME, route_prefix="/")
    if not _wait_until_running(constants.SERVE_APP_NAME, constants.SERVE_START_TIMEOUT_S, stop):
        _shutdown(args.address is not None)
        return 0 if stop.is_set() else 1
    print(f"ready in {time.time() - t0:.0f}s: http://{host}:{port}/v1  (models: {', '.join(m.name for m in cfg.models)})")
    print(f"  try: curl http://{host}:{port}/v1/models    status: homefire status", flush=True)
    if args.detach:
        return 0
    stop.wait()
    _shutdown(args.address is not None)
    return 0


def _shutdown(remote: bool) -> None:
    """Delete the app (on a cluster) or stop Serve and the local Ray this command started."""
    import ray
    from ray import serve

    print("shutting down ...", flush=True)
    try:
        if remote:
            serve.delete(constants.SERVE_APP_NAME)
        else:
            serve.shutdown()
    except Exception as err:  # Ctrl-C in a terminal also reaches Ray's own processes; they may be gone already
        print(f"note: Serve did not shut down cleanly ({type(err).__name__}: {err}); stopping Ray", flush=True)
    finally:
        ray.shutdown()


def _wait_until_running(app: str, timeout_s: float, stop: threading.Event) -> bool:
    """Poll the app until it runs; print progress lines; False on failure or timeout (bounded wait)."""
    from homefire.serve.status import app_status, format_status

    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline and not stop.is_set():
        st = app_status(app)
        if st["status"] == "RUNNING":
            return True
        if st["status"] == "DEPLOY_FAILED":
            print(format_status(st), file=sys.stderr)
            return False
        line = ", ".join(
            f"{d.get('model') or n}: {d['running']} running/{d['starting']} starting/{d['pending']} pending"
            for n, d in st["deployments"].items()
        )
        if line != last:
            print(f"  [{time.time() - deadline + timeout_s:5.0f}s] {line or st['status']}", flush=True)
            last = line
        stop.wait(2)
    if stop.is_set():
        return False
    print(f"the app did not start within {timeout_s:.0f}s (HOMEFIRE_SERVE_START_TIMEOUT_S):", file=sys.stderr)
    print(format_status(app_status(app)), file=sys.stderr)
    return False


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    from homefire.serve.status import app_status, format_status

    ray.init(address=args.address, logging_level="ERROR")
    st = app_status(args.app)
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return 0 if st["status"] != "NOT_RUNNING" else 1


def cmd_models(args: argparse.Namespace) -> int:
    from homefire.registry import Registry

    reg = Registry()
    if args.models_command == "list":
        entries = reg.list()
        if not entries:
            print(f"registry {reg.root} is empty; run `homefire models build`")
        for e in entries:
            print(f"{e.ref:<24} {e.kind:<10} {e.path}")
        return 0
    from homefire.models.build import DEMO_RECIPES, ensure_model

    names = args.names or list(DEMO_RECIPES)
    for name in names:
        if name not in DEMO_RECIPES:
            raise ConfigError(f"unknown demo model '{name}'. Fix: use one of {', '.join(DEMO_RECIPES)}")
        e = ensure_model(DEMO_RECIPES[name], reg)
        print(f"{e.ref:<24} {e.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler: dict[str, Any] = {"serve": cmd_serve, "status": cmd_status, "models": cmd_models}
    try:
        return handler[args.command](args)
    except HomefireError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
