"""Node autoscaling from serve demand, on Ray's fake multi-node provider.

A model whose replicas ask for a GPU, scaled from zero by load, makes Ray's autoscaler add
GPU worker nodes; when the load ends and the idle timeout passes, the nodes go away.
The engine is the mock (the layers under test are Serve and the autoscaler, not vLLM).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
from ray.cluster_utils import AutoscalingCluster

from tests.helpers import free_port

pytestmark = pytest.mark.integration


class FakeGPUCluster(AutoscalingCluster):
    """AutoscalingCluster whose base config is built here: the wheel omits the
    fake_multi_node/example.yaml it reads (ray 2.60), so the same keys are given in code."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = {
            "cluster_name": "homefire-fake", "max_workers": 4,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
            "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }
        config.update(config_kwargs)
        return config


def _gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def _wait_for(pred, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def test_gpu_replicas_bring_gpu_nodes_and_idle_nodes_go_away(tiny_model_path):
    cluster = FakeGPUCluster(
        head_resources={"CPU": 4},
        worker_node_types={
            "gpu-worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
    )
    cluster.start()
    try:
        ray.init(address="auto")
        from ray import serve

        from homefire.serve import build_app

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve._run(build_app({
            "models": [{
                "name": "gpu-model", "source": tiny_model_path, "engine": "mock", "gpus": 1, "cpus": 0.5,
                "token_delay_s": 0.05,
                "autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
                                "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                                "look_back_period_s": 1},
            }],
            "server": {"cold_start_timeout_s": 120},
        }), name="homefire", route_prefix="/")
        assert _gpu_nodes() == 0

        stop = threading.Event()
        answered: list[int] = []

        def load():
            while not stop.is_set():
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=180,
                               json={"model": "gpu-model", "prompt": "x", "max_tokens": 20})
                answered.append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            _wait_for(lambda: _gpu_nodes() >= 2, 150, "two GPU worker nodes joining")
            _wait_for(lambda: answered.count(200) >= 4, 120, "requests answered on the new nodes")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=200)
        assert set(answered) == {200}
        # Idle: replicas scale to zero, then the autoscaler removes the idle GPU nodes.
        _wait_for(lambda: _gpu_nodes() == 0, 180, "idle GPU nodes being removed")
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
