"""Placement of replicas of several engine workers, on a real two-node Ray cluster with logical GPUs.

``ray.cluster_utils.Cluster`` starts two raylets on this box, each declaring 2 GPUs (Ray's resources are logical), and
Serve places the mock engine's replicas (the only fake, at the engine seam): a replica of N workers reserves a
placement group, whose bundles and nodes ``GET /v1/status`` and ``homefire status`` report, and a replica whose group
no node can hold (4 GPUs under STRICT_PACK on nodes of 2) is reported as one that cannot be placed.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.integration


def _mock(name, **kw):
    return {"name": name, "source": "demo-tiny", "engine": "mock", "cpus": 0.1, **kw}


def _wait_for(pred, timeout_s: float, every_s: float = 0.5):
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            last = pred()
        except (httpx.HTTPError, KeyError, ValueError) as err:  # not serving yet
            last = err
        if last is True:
            return
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last: {last!r})")


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from homefire.serve import build_app

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    # The dashboard (Ray's state API: pending actors) on a port of its own: another Ray on this box may hold 8265.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2, "include_dashboard": True,
                                                        "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    worker = c.add_node(num_cpus=4, num_gpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    # One proxy (on the head): two raylets on one host cannot both bind the API port.
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    c.base_url = f"http://127.0.0.1:{port}"
    c.nodes = {"head": c.head_node.node_id, "worker": worker.node_id}
    serve._run(build_app({"models": [
        # One GPU on each node, whatever else runs.
        _mock("spread", gpus=2, tensor_parallel=2, placement_strategy="STRICT_SPREAD"),
        # Four GPUs on one node: no node has them.
        _mock("strict4", gpus=4, tensor_parallel=4),
    ]}), _blocking=False, name="homefire", route_prefix="/")
    _wait_for(lambda: _dep(c, "spread")["running"] == 1, 120)
    # Now one GPU is free on each node: a PACK group of two must span both.
    serve._run(build_app({"models": [_mock("pp2", gpus=2, pipeline_parallel=2)]}), _blocking=False, name="second",
               route_prefix="/second")
    _wait_for(lambda: _dep(c, "pp2", "/second")["running"] == 1, 120)
    yield c
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def _dep(c, model: str, prefix: str = "") -> dict:
    st = httpx.get(f"{c.base_url}{prefix}/v1/status", timeout=30).json()
    return st["deployments"][f"model-{model}"]


def test_strict_spread_puts_one_gpu_bundle_on_each_node(cluster):
    (pg,) = _dep(cluster, "spread")["placement_groups"]
    assert pg["state"] == "CREATED" and pg["strategy"] == "STRICT_SPREAD"
    # The replica's CPU in bundle 0 beside the first GPU; vLLM's Ray executor would put a worker in each.
    assert pg["bundles"] == [{"CPU": 0.1, "GPU": 1.0}, {"GPU": 1.0}]
    assert sorted(pg["nodes"]) == sorted(cluster.nodes.values())


def test_pipeline_stages_pack_across_nodes_when_no_node_has_room_for_both(cluster):
    dep = _dep(cluster, "pp2", "/second")
    (pg,) = dep["placement_groups"]
    assert pg["strategy"] == "PACK" and pg["state"] == "CREATED" and len(pg["bundles"]) == 2
    assert sorted(pg["nodes"]) == sorted(cluster.nodes.values())
    assert dep["running"] == 1 and dep["pending"] == 0


def test_a_group_no_node_can_hold_is_reported_as_not_placeable(cluster):
    _wait_for(lambda: _dep(cluster, "strict4")["pending"] == 1, 60)
    dep = _dep(cluster, "strict4")
    assert dep["running"] == 0 and dep["starting"] == 0
    (pg,) = dep["placement_groups"]
    assert pg["state"] == "PENDING" and pg["strategy"] == "STRICT_PACK"
    assert pg["bundles"] == [{"CPU": 0.1, "GPU": 4.0}] and pg["nodes"] == [None]
    st = httpx.get(cluster.base_url + "/v1/status", timeout=30).json()
    assert st["cluster"]["total"]["GPU"] == 4  # the cluster has 4 GPUs, but no node has 4


def test_homefire_status_command_says_what_the_unplaceable_replica_needs(cluster):
    out = subprocess.run([sys.executable, "-m", "homefire.cli", "status", "--address", cluster.address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith("model-strict4"))
    assert row.split()[-3:] == ["0", "0", "1"]
    assert ("1 replica(s) cannot be placed: each needs a placement group of 1 x {CPU: 0.1, GPU: 4} (STRICT_PACK)"
            in out.stdout)


def test_placed_parallel_replicas_serve(cluster):
    client = openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.completions.create(model="spread", prompt="hi", max_tokens=3).usage.completion_tokens == 3
    second = openai.OpenAI(base_url=cluster.base_url + "/second/v1", api_key="unused", max_retries=0, timeout=60)
    assert second.completions.create(model="pp2", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_with_the_clusters_node_types_known_a_replica_none_can_hold_is_refused_at_load(cluster, monkeypatch):
    """The same 4-GPU replica, on a cluster whose config names its node types (``ray up`` leaves it on the head;
    here aws-minimal's, 1 GPU at most, besides the two live 2-GPU nodes): refused before anything deploys."""
    from pathlib import Path

    from homefire.errors import ConfigError
    from homefire.serve import build_app

    monkeypatch.setenv("HOMEFIRE_CLUSTER_CONFIG", str(Path(__file__).parents[2] / "cluster" / "aws-minimal.yaml"))
    with pytest.raises(ConfigError) as err:
        build_app({"models": [_mock("four", gpus=4, tensor_parallel=2, pipeline_parallel=2,
                                    placement_strategy="STRICT_PACK")]})
    msg = str(err.value)
    assert msg.startswith("models.0.tensor_parallel: a replica of 'four' needs 4 GPUs on one node"), msg
    assert "gpu_a10g_1x: 1" in msg and ": 2" in msg, msg  # the config's node types and the live nodes
    build_app({"models": [_mock("two", gpus=2, tensor_parallel=2)]})  # a live node holds 2
