"""Builders: config in, Serve application out. ``homefire.serve:build_app`` is what
``serve run`` / ``serve deploy`` configs name as their ``import_path``.

Example (a Serve config)::

    applications:
      - name: homefire
        route_prefix: /
        import_path: homefire.serve:build_app
        args: {models: [{name: demo, source: demo}]}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from homefire import constants
from homefire.config import load_yaml, validate_config
from homefire.errors import ConfigError
from homefire.registry import FORMAT_ENGINES, Registry, detect_format
from homefire.serve.config import AnyModelConfig, AppConfig

#: Streaming chunks leave the model replica at most this often after the first token (unset: stream_interval_s).
_INTERVAL = os.environ.get("HOMEFIRE_STREAM_INTERVAL_S")
STREAM_INTERVAL_S: float | None = float(_INTERVAL) if _INTERVAL else None
#: The batching interval where a Ray hop follows the model replica.
HOP_STREAM_INTERVAL_S = 0.05
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def deployment_name(model: AnyModelConfig) -> str:
    return "model-" + model.name.replace("/", "--")


def resolve_model(model: AnyModelConfig, registry: Registry) -> tuple[str, str]:
    """(what the engine loads, the base's registry ref or path); demo models are built on demand.

    Raises:
        ConfigError: the source's format (hf, onnx, gguf, ...) is not one the model's engine runs.
    """
    from homefire.models.build import resolve_source

    path, entry = resolve_source(model.source, registry)
    local = Path(path).exists()
    fmt = entry.format if entry is not None else detect_format(path) if local else "hf"
    engines = FORMAT_ENGINES.get(fmt, ())
    if model.engine != "mock" and model.engine not in engines:
        fix = (f"set engine: {engines[0]}" if engines else "serve a model entry, not an adapter")
        if fmt == "hf":
            fix += f", or make a {model.engine} format first: homefire models convert {model.source} --to " + (
                "onnx-int4" if model.engine == "onnx" else "gguf-q8_0")
        raise ConfigError(
            f"model '{model.name}': source '{model.source}' is a {fmt} model, which engine '{model.engine}' cannot "
            f"run. Fix: {fix}"
        )
    return path, entry.ref if entry is not None else path


def _model_options(m: AnyModelConfig, drain_timeout_s: float) -> dict[str, Any]:
    from homefire.serve.routing import router_config

    placement = m.placement()
    opts: dict[str, Any] = {
        "name": deployment_name(m),
        "ray_actor_options": placement.actor,
        "max_ongoing_requests": m.max_ongoing_requests,
        # Per caller (the ingress): past it, requests are refused at once (the ingress answers 503 + Retry-After).
        "max_queued_requests": m.max_queued_requests or m.max_ongoing_requests,
        "health_check_period_s": m.health_check_period_s,
        "health_check_timeout_s": 30,
        # A redeploy (`serve deploy`) lets a replica finish what it holds before it stops.
        "graceful_shutdown_timeout_s": drain_timeout_s,
        # homefire's routers (the model's `routing`), which also hand the replicas' engine stats to /v1/status.
        "request_router_config": router_config(m.routing),
    }
    if placement.bundles:
        # Serve reserves the group per replica, before the replica starts, and removes it with the replica; a
        # group the cluster cannot hold leaves the replica pending (homefire status reports it).
        opts["placement_group_bundles"] = placement.bundles
        opts["placement_group_strategy"] = placement.strategy
    if m.autoscaling is not None:
        opts["autoscaling_config"] = m.autoscaling.to_serve()
        # `num_replicas` must be "auto" or unset when autoscaling.
    else:
        opts["num_replicas"] = m.replicas or 1
    return opts


#: Where ``ray up`` leaves the cluster's config on the head node (the autoscaler reads its node types there).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def node_types_from_cluster_config(path: str | Path) -> dict[str, dict[str, float]]:
    """``{node type: resources}`` of a Ray cluster config (``available_node_types``; those that may have nodes)."""
    cfg = load_yaml(Path(path).expanduser())
    return {name: {k: float(v) for k, v in (t.get("resources") or {}).items()}
            for name, t in (cfg.get("available_node_types") or {}).items()
            if t.get("max_workers", 1) != 0 or name == cfg.get("head_node_type")}


def node_types() -> dict[str, dict[str, float]] | None:
    """The node types this Ray cluster may have, ``{name: resources}``, with each live node's resources too: from
    the node types Ray's autoscaler keeps in the GCS (autoscaler v2, KubeRay), else from the cluster config ``ray
    up`` left on the head (``HOMEFIRE_CLUSTER_CONFIG`` names another). None where Ray is not connected or no node
    types are known (a local Ray, a cluster started by hand: new nodes may join it, so nothing is ruled out)."""
    import ray

    if not ray.is_initialized():
        return None
    types: dict[str, dict[str, float]] = {}
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001  (a private API: if it moves, the file below or nothing)
        config = None
    if config is not None:
        types = {g.name: dict(g.resources) for g in config.node_group_configs if g.max_count != 0}
    path = Path(os.environ.get("HOMEFIRE_CLUSTER_CONFIG") or BOOTSTRAP_CONFIG).expanduser()
    if not types and path.is_file():
        try:
            types = node_types_from_cluster_config(path)
        except (ConfigError, OSError, AttributeError):
            types = {}
    if not types:
        return None
    for node in ray.nodes():
        if node.get("Alive"):
            types.setdefault(f"node {node['NodeManagerAddress']}", dict(node.get("Resources", {})))
    return types


def check_fits_node_types(cfg: AppConfig, types: dict[str, dict[str, float]] | None) -> None:
    """Refuse a model whose replica needs more GPUs on one node than any node type of the cluster has.

    Raises:
        ConfigError: naming ``models.<i>.tensor_parallel`` (or ``gpus``), the node types and the fix.
    """
    if not types:
        return
    most = max(t.get("GPU", 0.0) for t in types.values())
    for i, m in enumerate(cfg.models):
        placement = m.placement()
        bundles = placement.bundles or [{"GPU": placement.actor.get("num_gpus", 0)}]
        need = math.ceil(max(b.get("GPU", 0.0) for b in bundles))  # a GPU fraction still needs a node with a GPU
        if need == 0 or need <= most:
            continue
        key = "tensor_parallel" if getattr(m, "workers", 1) > 1 else "gpus"
        listed = ", ".join(f"{n}: {t.get('GPU', 0):g}" for n, t in sorted(types.items()))
        raise ConfigError(
            f"models.{i}.{key}: a replica of '{m.name}' needs {need:g} GPUs on one node, but no node type of this "
            f"cluster has that many (GPUs per node: {listed}). Fix: lower tensor_parallel (or gpus); or split the "
            "replica across nodes with pipeline_parallel and placement_strategy: PACK; or add a node type with "
            f"{need:g} GPUs to the cluster config (cluster/*.yaml)"
        )


def code_version(init: tuple[Any, ...]) -> str:
    """A model deployment's version for Serve: what its replicas are built from (homefire's version and the
    arguments of its ModelServer), less what Serve applies to running replicas: the model's ``routing`` (the
    callers' routers), ``replicas`` and ``autoscaling``.

    Serve restarts a deployment's replicas on a redeploy only when this, their resources or their placement
    change; a new ``routing``, ``replicas`` or autoscaling bound is applied to the running replicas (their engines
    stay up). Without one Serve draws a random version at every ``serve.run``, restarting every engine.
    """
    from homefire import __version__

    cfg, *rest = init
    cfg = {k: v for k, v in cfg.items() if k not in ("routing", "replicas", "autoscaling")}
    blob = json.dumps([__version__, cfg, *rest], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_app(args: dict[str, Any] | None = None):
    """Build the homefire Serve application.

    Args:
        args: an :class:`~homefire.serve.config.AppConfig` as a dict, or ``{"config": "<path to yaml>"}``;
            empty means the embedded default (two offline demo models).

    Returns:
        A bound Serve application, ready for ``serve.run``.

    Raises:
        ConfigError: naming the bad key and the fix.
    """
    from ray import serve

    from homefire.serve.ingress import Ingress
    from homefire.serve.server import ModelServer

    cfg = load_app_config(args)
    check_fits_node_types(cfg, node_types())
    registry = Registry(cfg.registry) if cfg.registry else Registry()
    server = cfg.server.model_dump(mode="json")
    # Keys live in the environment of whoever builds the app; hand them to the ingress without writing them to disk.
    server["api_keys"] = [k.get_secret_value() for k in cfg.server.api_keys]
    if cfg.server.api_key_env and os.environ.get(cfg.server.api_key_env):
        server["api_keys"] += [k.strip() for k in os.environ[cfg.server.api_key_env].split(",") if k.strip()]
    if cfg.ingress_with_model():
        return _ingress_with_model(cfg, server, registry)
    handles, deployments, optional = {}, {}, []
    for m in cfg.models:
        path, base_ref = resolve_model(m, registry)
        init = (m.model_dump(mode="json"), path, stream_interval_s(hop=True), registry.uri, base_ref)
        dep = serve.deployment(ModelServer).options(**_model_options(m, cfg.server.drain_timeout_s))
        # Serve 2.60 takes no `version` option any more but still deploys `_version` when set (serve.run's client;
        # a `serve deploy` config gets its version from the config instead).
        dep._version = code_version(init)
        handles[m.name] = dep.bind(*init)
        deployments[deployment_name(m)] = m.name
        if m.autoscaling is not None and m.autoscaling.min_replicas == 0:
            optional.append(m.name)  # scaled to zero by design: readiness does not wait for it
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=cfg.server.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.server.ingress_cpus},
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=cfg.server.drain_timeout_s,
    )
    engines = {m.name: m.engine for m in cfg.models}
    return ingress.bind(server, handles, deployments, int(time.time()), optional, engines=engines)


def _ingress_with_model(cfg: AppConfig, server: dict[str, Any], registry: Registry):
    """One deployment that is both the ingress and the model's replica (``server.ingress: with_model``): it has
    the model's placement, replicas and health check, and bounds admission itself."""
    from ray import serve

    from homefire.serve.ingress import Ingress

    m = cfg.models[0]
    path, base_ref = resolve_model(m, registry)
    opts = _model_options(m, cfg.server.drain_timeout_s)
    del opts["max_queued_requests"]
    del opts["request_router_config"]  # Serve's proxy routes raw HTTP here, if anything does: no prompt to read
    # Named as the model's deployment (status, readiness and `homefire status` show the model); admission is the
    # ingress's own (LocalHandle), so Serve's router never holds a request back.
    opts["max_ongoing_requests"] = 10_000
    local = {
        "model": m.model_dump(mode="json"), "model_path": path, "stream_interval_override_s": STREAM_INTERVAL_S,
        "registry_root": registry.uri, "base_ref": base_ref,
        "max_requests": m.max_ongoing_requests + (m.max_queued_requests or m.max_ongoing_requests),
    }
    return serve.deployment(Ingress).options(**opts).bind(
        server, {}, {opts["name"]: m.name}, int(time.time()), (), local, engines={m.name: m.engine})


def stream_interval_s(hop: bool, override: float | None = STREAM_INTERVAL_S) -> float:
    """How long streamed chunks are batched in the model replica (the first leaves at once). Across a Ray ``hop``
    each item costs CPU on both sides, so they leave every 50 ms; with no hop they leave as the engine makes them, as
    from a bare engine. ``override`` (``HOMEFIRE_STREAM_INTERVAL_S`` where the app is built) sets every case."""
    if override is not None:
        return override
    return HOP_STREAM_INTERVAL_S if hop else 0.0


def load_app_config(args: dict[str, Any] | None) -> AppConfig:
    """Accept a homefire app config dict, ``{"config": path}``, or nothing (the embedded default)."""
    args = dict(args or {})
    if not args:
        return app_config_from_file(DEFAULT_CONFIG)
    if set(args) == {"config"}:
        return app_config_from_file(args["config"])
    return validate_config(AppConfig, args, "serve args")


def app_config_from_file(path: str | Path) -> AppConfig:
    """Read a homefire serve YAML: either an AppConfig, or a Serve config whose app runs ``build_app``."""
    data = load_yaml(path)
    if isinstance(data, dict) and "applications" in data:
        apps = [a for a in data["applications"] or [] if str(a.get("import_path", "")).startswith("homefire.serve")]
        if len(apps) != 1:
            raise ConfigError(
                f"{path}: expected exactly one application with import_path 'homefire.serve:build_app', "
                f"found {len(apps)}. Fix: point one application at homefire.serve:build_app"
            )
        data = apps[0].get("args") or {}
        if not data:
            return app_config_from_file(DEFAULT_CONFIG)
    return validate_config(AppConfig, data, str(path))


def serve_http_options(path: str | Path | None) -> dict[str, Any]:
    """The ``http_options`` block of a Serve config file, if any."""
    if path is None:
        return {}
    data = load_yaml(path)
    if isinstance(data, dict):
        return dict(data.get("http_options") or {})
    return {}


__all__ = ["DEFAULT_CONFIG", "STREAM_INTERVAL_S", "build_app", "constants", "load_app_config", "stream_interval_s"]
