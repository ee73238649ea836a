"""Every environment knob homefire reads, in one place, units in the name."""

from __future__ import annotations

import os
from pathlib import Path


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


#: Where built models, the registry and benchmark outputs are cached.
HOME_DIR = Path(os.environ.get("HOMEFIRE_HOME", Path.home() / ".cache" / "homefire"))
#: Registry root: a local directory, or an fsspec URI every node of a cluster reads (s3://bucket/registry, gs://...).
REGISTRY_DIR = os.environ.get("HOMEFIRE_REGISTRY") or str(HOME_DIR / "registry")
#: API key required on every route but health, when set (overrides none in the config; adds to them).
API_KEY_ENV = "HOMEFIRE_API_KEY"

#: Longest wait for an engine to become ready inside a replica.
ENGINE_START_TIMEOUT_S = _env_float("HOMEFIRE_ENGINE_START_TIMEOUT_S", 600.0)
#: Longest wait for a replica when a model is scaled to zero (or all replicas are busy starting).
COLD_START_TIMEOUT_S = _env_float("HOMEFIRE_COLD_START_TIMEOUT_S", 300.0)
#: Longest wait for the readiness route's replica probes.
HEALTH_CHECK_TIMEOUT_S = _env_float("HOMEFIRE_HEALTH_CHECK_TIMEOUT_S", 5.0)
#: How often a model replica checks that its engine lives (a dead engine makes the replica exit and be replaced).
ENGINE_WATCH_S = _env_float("HOMEFIRE_ENGINE_WATCH_S", 0.5)
#: Longest wait for a replica to load a LoRA adapter from the registry.
ADAPTER_LOAD_TIMEOUT_S = _env_float("HOMEFIRE_ADAPTER_LOAD_TIMEOUT_S", 120.0)
#: How often a replica re-reads the registry for a newer version of an adapter it has loaded.
ADAPTER_REFRESH_S = _env_float("HOMEFIRE_ADAPTER_REFRESH_S", 5.0)
#: Where training runs (checkpoints, reports) go unless the config sets storage_path.
RUNS_DIR = Path(os.environ.get("HOMEFIRE_RUNS", HOME_DIR / "runs"))
#: Longest wait for `homefire serve` to see every deployment running.
SERVE_START_TIMEOUT_S = _env_float("HOMEFIRE_SERVE_START_TIMEOUT_S", 900.0)

#: Name of the Serve application `homefire serve` deploys.
SERVE_APP_NAME = os.environ.get("HOMEFIRE_SERVE_APP_NAME", "homefire")
#: Default API bind address: loopback unless the user asks otherwise.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
