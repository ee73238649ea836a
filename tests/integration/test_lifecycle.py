"""`homefire serve` as a process manager sees it: start, stop, start again; a busy port; SIGTERM with requests in
flight on the real vLLM CPU engine (drain: they finish, new ones are refused, exit 0, nothing left running)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from homefire.serve.runner import port_in_use
from tests.helpers import free_port, free_service_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CYCLES = 3  # the port-reuse failure this guards against showed in the 2nd-3rd cycle


def _serve(cfg: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    # Its own session, like a service: signals in this test reach only the processes they are sent to.
    return subprocess.Popen([sys.executable, "-m", "homefire.cli", "serve", str(cfg), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def _wait_ready(proc: subprocess.Popen, port: int, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read()[-5000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"not ready within {timeout_s}s:\n{proc.stdout.read()[-5000:]}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _terminate(proc: subprocess.Popen, timeout_s: float = 120, ctrl_c: bool = False) -> str:
    """SIGTERM to the server process alone (as `docker stop` and Kubernetes send it), or Ctrl-C: SIGINT to its whole
    process group (Ray's own processes ignore it); its output."""
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"no exit within {timeout_s}s of SIGTERM:\n{out[-5000:]}")
    return out


def _alive(procs: list[psutil.Process], wait_s: float = 20) -> list[str]:
    """The processes of ``procs`` still running (zombies waiting for a reaper count as gone) after ``wait_s``."""
    deadline = time.time() + wait_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.25)


def test_repeated_start_stop_cycles_on_one_port_all_start_serve_and_exit_0(tmp_path, tiny_model_path):
    """Start, serve (two models, API keys from the environment), stop; CYCLES times on the same port. Stops alternate
    between Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and SIGTERM to the server alone."""
    models = [{"name": n, "source": tiny_model_path, "engine": "mock", "cpus": 0.2} for n in ("a", "b")]
    two, one = tmp_path / "two.yaml", tmp_path / "one.yaml"  # two models the first time; then one (faster)
    two.write_text(yaml.safe_dump({"models": models}))
    one.write_text(yaml.safe_dump({"models": models[1:]}))
    port = free_service_port()
    base = f"http://127.0.0.1:{port}"
    took = []
    for i in range(CYCLES):
        t0 = time.time()
        proc = _serve(two if i == 0 else one, port, env={**os.environ, "HOMEFIRE_API_KEY": "k1,k2"})
        try:
            _wait_ready(proc, port)
            client = openai.OpenAI(base_url=base + "/v1", api_key="k2" if i % 2 else "k1", max_retries=0)
            assert client.completions.create(model="b", prompt="x", max_tokens=3).usage.completion_tokens == 3, i
            if i == 0:
                assert {m.id for m in client.models.list().data} == {"a", "b"}
                assert httpx.get(base + "/v1/models", timeout=5).status_code == 401
            tree = _descendants(proc.pid)
        finally:
            out = _terminate(proc, ctrl_c=i % 2 == 0)
        # The client held its keep-alive connection open through the stop (as SDKs and proxies do): the server's side
        # of it lingers in the kernel (FIN-WAIT-2, then TIME-WAIT) for up to a minute after. The next start must
        # not care (it did: the deploy failed on the busy port).
        client.close()
        assert proc.returncode == 0, f"cycle {i}:\n{out[-5000:]}"
        assert ("deploying a, b" if i == 0 else "deploying b") in out, f"cycle {i}:\n{out[-5000:]}"
        assert "stopped" in out and "Traceback" not in out, f"cycle {i}:\n{out[-5000:]}"
        assert not _alive(tree), f"cycle {i}: left running: {_alive(tree)}"
        took.append(time.time() - t0)
        assert "held by a previous run" not in out, f"cycle {i} waited for the port:\n{out[-3000:]}"
    print(f"{CYCLES} start/serve/stop cycles on port {port}: {sum(took) / len(took):.1f}s each (max {max(took):.1f}s)")


def test_a_deployment_that_fails_prints_the_replicas_own_exception_and_exits_1(tmp_path, tiny_model_path):
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(yaml.safe_dump({"models": [
        {"name": "slow", "source": tiny_model_path, "engine": "mock", "cpus": 0.2, "start_delay_s": 30},
    ]}))
    port = free_port()
    proc = _serve(cfg, port, env={**os.environ, "HOMEFIRE_ENGINE_START_TIMEOUT_S": "1"})
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-5000:]
    assert "DEPLOY_FAILED" in out and "mock engine did not start within 1.0s" in out, out[-5000:]
    assert not port_in_use("127.0.0.1", port)


def test_a_busy_port_is_refused_before_ray_starts_naming_its_owner_and_the_fix(tmp_path, tiny_model_path):
    cfg = tmp_path / "mock.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "m", "source": tiny_model_path, "engine": "mock"}]}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "homefire.cli", "serve", str(cfg), "--port", str(port)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in out.stderr, out.stderr
    assert f"--port {port + 10}" in out.stderr and "starting Ray" not in out.stdout
    assert time.time() - t0 < 30


def test_sigterm_drains_vllm_requests_in_flight_refuses_new_ones_and_exits_0(tmp_path, tiny_model_path):
    """8 streams and 8 plain requests are generating when SIGTERM arrives: every one finishes in full, a request
    sent after it is refused with 503 + Retry-After, the command exits 0 and no Ray or vLLM process is left."""
    port = free_port()
    cfg = tmp_path / "vllm.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": tiny_model_path, "max_model_len": 512}],
                                   "server": {"drain_timeout_s": 60}}))
    proc = _serve(cfg, port)
    url = f"http://127.0.0.1:{port}/v1/completions"
    results: list = []
    TOKENS = 200  # per request: 16 of them still generate for many seconds after SIGTERM on this box

    def request(stream: bool) -> None:
        body = {"model": "tiny", "prompt": "x", "max_tokens": TOKENS, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        try:
            with httpx.Client(timeout=120) as h:
                if stream:
                    with h.stream("POST", url, json=body) as r:
                        text = "".join(r.iter_text())
                    usage = re.search(r'"completion_tokens": ?(\d+)', text)
                    results.append((r.status_code, int(usage[1]) if usage else 0, text.rstrip().endswith("data: [DONE]")))
                else:
                    r = h.post(url, json=body)
                    results.append((r.status_code, r.json().get("usage", {}).get("completion_tokens"), True))
        except httpx.HTTPError as err:
            results.append((type(err).__name__, 0, False))

    try:
        _wait_ready(proc, port)
        tree = _descendants(proc.pid)
        assert any("EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name() for p in tree if p.is_running())
        threads = [threading.Thread(target=request, args=(i % 2 == 0,)) for i in range(16)]
        for t in threads:
            t.start()
        deadline = time.time() + 60  # until all 16 are generating
        while time.time() < deadline:
            m = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            if 'homefire_ongoing_requests{model="tiny"} 16.0' in m:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        late = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
        for t in threads:
            t.join(180)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert late.status_code == 503 and late.headers.get("retry-after"), late.text
    assert late.json()["error"]["code"] == "shutting_down"
    assert sorted(results) == [(200, TOKENS, True)] * 16, results
    assert proc.returncode == 0, out[-5000:]
    assert "every request in flight finished" in out and "stopped" in out, out[-5000:]
    assert not _alive(tree), f"left running after exit: {_alive(tree)}"
