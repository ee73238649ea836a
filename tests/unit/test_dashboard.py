"""The Grafana dashboard only queries series the API exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from homefire.serve.metrics import ServeMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "serve" / "dashboards" / "homefire.json"


def test_dashboard_queries_exported_series():
    dash = json.loads(DASHBOARD.read_text())
    m = ServeMetrics()
    m.observe_stats("x", {"prompt_tokens": 1, "completion_tokens": 2, "ttft_s": 0.1, "itl_s": [0.01]})
    m.requests.labels("x", "chat", "200").inc()
    m.errors.labels("x", "t").inc()
    m.e2e.labels("x").observe(1)
    m.ongoing.labels("x").set(1)
    exported = {line.split("{")[0].split(" ")[0] for line in m.render().decode().splitlines() if not line.startswith("#")}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"homefire_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    assert len(dash["panels"]) >= 6
