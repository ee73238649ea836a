"""What is running, what is starting, and what cannot be placed.

``homefire status`` and ``GET /v1/status`` both report this. A replica whose actor waits
for resources the cluster lacks (say a fifth half-GPU replica on two GPUs), or whose
placement group (a replica of several engine workers) the cluster cannot hold, is *pending*,
with the resources it needs and what the cluster has free, instead of queueing silently.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def _pending_replica_actors(app_name: str) -> dict[str, int]:
    """Count replica actors still waiting for resources, per deployment."""
    import ray
    from ray.util.state import list_actors

    # Name this cluster explicitly: with several Ray instances on one host, "auto" refuses to choose.
    address = ray.get_runtime_context().gcs_address
    counts: dict[str, int] = {}
    prefix = f"ServeReplica:{app_name}:"
    for actor in list_actors(
        address=address, filters=[("state", "=", "PENDING_CREATION")], limit=10_000, raise_on_missing_output=False
    ):
        cls = actor.class_name or ""
        if cls.startswith(prefix):
            dep = cls[len(prefix):]
            counts[dep] = counts.get(dep, 0) + 1
    return counts


def _replica_placement_groups(app_name: str) -> dict[str, list[dict[str, Any]]]:
    """The placement groups Serve reserved for this app's replicas (a replica of several engine workers), per
    deployment: state, strategy, bundles and the node each bundle is on (None while pending)."""
    import ray

    # Serve names a replica's group after the replica: SERVE_REPLICA::<app>#<deployment>#<id>.
    prefix = f"SERVE_REPLICA::{app_name}#"
    groups: dict[str, list[dict[str, Any]]] = {}
    for pg in ray.util.placement_group_table().values():
        name = pg.get("name") or ""
        if not name.startswith(prefix) or pg.get("state") == "REMOVED":
            continue
        dep = name[len(prefix):].rsplit("#", 1)[0]
        nodes = pg.get("bundles_to_node_id") or {}
        groups.setdefault(dep, []).append({
            "state": pg["state"], "strategy": pg["strategy"],
            "bundles": [dict(b) for _, b in sorted(pg["bundles"].items())],
            "nodes": [nodes.get(i) or None for i in sorted(pg["bundles"])],  # "" while unplaced
        })
    return groups


def _bundles_text(group: dict[str, Any]) -> str:
    """``2 x {GPU: 1} + ... (STRICT_PACK)`` for a placement group's bundles."""
    counts: dict[str, int] = {}
    for b in group["bundles"]:
        key = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}"
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n} x {k}" for k, n in counts.items()) + f" ({group['strategy']})"


def app_status(app_name: str, deployment_models: dict[str, str] | None = None, pending: bool = True) -> dict[str, Any]:
    """Status of one Serve application, per deployment, with pending replicas called out.

    Args:
        app_name: the Serve application name.
        deployment_models: deployment name -> served model name (for friendlier output).
        pending: ask Ray's state API which replicas wait for resources (slower; readiness skips it).
    """
    import ray
    from ray import serve

    status = serve.status()
    app = status.applications.get(app_name)
    if app is None:
        return {"app": app_name, "status": "NOT_RUNNING", "deployments": {}, "message": f"no app named '{app_name}'"}
    try:
        pending = _pending_replica_actors(app_name) if pending else {}
    except Exception as err:  # Ray's state API lives in the dashboard, which may be off or still starting
        logger.debug("pending replicas unknown: %s", err)
        pending = {}
    groups = _replica_placement_groups(app_name)  # from the GCS itself: no dashboard needed
    deployments = {}
    for name, dep in app.deployments.items():
        states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states or {}).items()}
        waiting = [g for g in groups.get(name, []) if g["state"] != "CREATED"]
        # A replica whose placement group the cluster cannot hold waits for the group (its actor may not exist yet).
        n_pending = max(pending.get(name, 0), len(waiting))
        model = (deployment_models or {}).get(name)
        if model is None and deployment_models is None and name.startswith("model-"):
            model = name[len("model-"):].replace("--", "/")
        deployments[name] = {
            "model": model,
            "status": str(getattr(dep.status, "value", dep.status)),
            "running": states.get("RUNNING", 0),
            "starting": max(0, states.get("STARTING", 0) - n_pending),
            "pending": n_pending,
            "replica_states": states,
            "message": dep.message,
        }
        if name in groups:
            deployments[name]["placement_groups"] = groups[name]
    return {
        "app": app_name,
        "status": str(getattr(app.status, "value", app.status)),
        "message": app.message,
        "deployments": deployments,
        "cluster": {"total": ray.cluster_resources(), "available": ray.available_resources()},
    }


def format_status(st: dict[str, Any], detail: bool = False) -> str:
    """A small table for the terminal; ``detail`` adds each failing deployment's own message (its exception)."""
    lines = [f"app {st['app']}: {st['status']}"]
    if st.get("message"):
        lines.append(f"  {st['message']}")
    lines.append(f"  {'deployment':<28} {'model':<16} {'status':<12} {'running':>7} {'starting':>8} {'pending':>7}")
    for name, d in st.get("deployments", {}).items():
        lines.append(
            f"  {name:<28} {d.get('model') or '-':<16} {d['status']:<12} {d['running']:>7} {d['starting']:>8} {d['pending']:>7}"
        )
        if d["pending"]:
            avail = st.get("cluster", {}).get("available", {})
            waiting = [g for g in d.get("placement_groups", []) if g["state"] != "CREATED"]
            needs = f" each needs a placement group of {_bundles_text(waiting[0])};" if waiting else ""
            lines.append(
                f"    {d['pending']} replica(s) cannot be placed:{needs} the cluster has "
                f"CPU {avail.get('CPU', 0):g}, GPU {avail.get('GPU', 0):g} free. {d.get('message') or ''}".rstrip()
            )
        elif detail and d["status"] in ("DEPLOY_FAILED", "UNHEALTHY") and d.get("message"):
            lines += [f"    {t}" for t in d["message"].splitlines()[-25:]]
    return "\n".join(lines)
