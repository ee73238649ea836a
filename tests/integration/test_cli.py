"""The commands a user types: `homefire serve` (default and a config), Ray's `serve run`, and bad configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.helpers import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=kw.pop("cwd", ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _wait_ready(proc: subprocess.Popen, base_url: str, models: set[str], key: str | None = None, timeout_s: float = 420):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read()[-5000:]}")
        try:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(base_url + "/v1/models", headers=headers, timeout=5)
            if r.status_code == 200 and {m["id"] for m in r.json()["data"]} == models:
                if httpx.get(base_url + "/ready", timeout=5).status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"server not ready within {timeout_s}s")


def _stop(proc: subprocess.Popen, timeout_s: float = 120) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    out = proc.stdout.read()
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
    return out


def test_bad_config_is_refused_before_ray_starts_naming_key_and_fix(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  - name: demo\n    source: demo\n    replica: 2\n")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "homefire.cli", "serve", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "models.0.replica: unknown key" in out.stderr and "did you mean 'replicas'" in out.stderr
    assert time.time() - t0 < 30


def test_homefire_serve_without_arguments_deploys_the_shipped_default_config():
    """`homefire serve` alone is `homefire serve serve/configs/default.yaml`: it starts deploying the demo models, and
    Ctrl-C while their engines start still shuts down cleanly. (That config's engines answering through Ray's
    `serve run` is the next test; a config's models answering through `homefire serve`, started and stopped ten
    times, is in test_lifecycle.py.)"""
    port = free_port()
    proc = _start([sys.executable, "-m", "homefire.cli", "serve", "--port", str(port)])
    seen = []
    try:
        deadline = time.time() + 180
        for line in proc.stdout:
            seen.append(line)
            if "deploying demo, demo-tiny" in line or time.time() > deadline:
                break
        assert "deploying demo, demo-tiny" in "".join(seen), "".join(seen)[-5000:]
    finally:
        out = "".join(seen) + _stop(proc)
    assert "shutting down" in out and proc.returncode == 0, out[-5000:]


@pytest.mark.slow
def test_ray_serve_run_starts_the_same_app_from_the_shipped_config(tmp_path):
    proc = _start(["serve", "run", str(ROOT / "serve" / "configs" / "default.yaml")], cwd=tmp_path)
    try:
        _wait_ready(proc, "http://127.0.0.1:8000", {"demo", "demo-tiny"})
        client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", max_retries=0)
        chunks = list(client.completions.create(model="demo-tiny", prompt="The", max_tokens=5, stream=True))
        assert sum(len(c.choices) for c in chunks) == 5
    finally:
        _stop(proc)


def test_serve_deploy_and_homefire_serve_address_on_a_running_cluster(tmp_path, tiny_model_path):
    """A started cluster (token auth on, dashboard on loopback): Ray's `serve deploy`, then `homefire serve --address`."""
    gcs_port, dash_port, api_port = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    # The cluster's token: made once per user (~/.ray/auth_token) unless one exists.
    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    subprocess.run(
        ["ray", "start", "--head", f"--port={gcs_port}", "--num-cpus=4", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash_port}", "--include-dashboard=true", "--disable-usage-stats"],
        check=True, capture_output=True, env=env, timeout=180,
    )
    address = f"127.0.0.1:{gcs_port}"
    try:
        cfg = tmp_path / "deploy.yaml"
        cfg.write_text(yaml.safe_dump({
            "http_options": {"host": "127.0.0.1", "port": api_port},
            "applications": [{
                "name": "homefire", "route_prefix": "/", "import_path": "homefire.serve:build_app",
                "args": {"models": [{"name": "deployed", "source": tiny_model_path, "engine": "mock", "cpus": 0.2}]},
            }],
        }))
        out = subprocess.run(["serve", "deploy", str(cfg), "--address", f"http://127.0.0.1:{dash_port}"],
                             capture_output=True, text=True, env=env, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="deployed", prompt="x", max_tokens=3).usage.completion_tokens == 3

        # Without the cluster's token, a client is refused.
        denied = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}')"], capture_output=True, text=True,
            env={**env, "RAY_AUTH_TOKEN": "not-the-token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, timeout=120,
        )
        assert denied.returncode != 0
        assert "auth" in (denied.stdout + denied.stderr).lower()

        status = subprocess.run([sys.executable, "-m", "homefire.cli", "status", "--address", address],
                                capture_output=True, text=True, env=env, timeout=120)
        assert status.returncode == 0 and "model-deployed" in status.stdout, status.stderr
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
