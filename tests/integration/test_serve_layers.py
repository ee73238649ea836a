"""The layers above the engine: GPU placement, autoscaling, scale-from-zero, failures.

These run the real Ray and Serve with the mock engine (the only fake, at the engine seam):
Ray's GPUs are logical, so placement on GPUs is tested by declaring two GPUs on this CPU box.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration


def _mock(name, **kw):
    return {"name": name, "source": "demo-tiny", "engine": "mock", "cpus": 0.1, **kw}


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    c = ServeCluster(num_cpus=8, num_gpus=2)
    c.deploy(
        {
            "models": [
                # Five half-GPU replicas on two GPUs: four fit, the fifth must be reported as pending.
                _mock("half-gpu", gpus=0.5, replicas=5),
                _mock("auto", autoscaling={
                    "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                    "upscale_delay_s": 0, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 1,
                }, token_delay_s=0.05),
                _mock("zero", autoscaling={"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 600}),
                _mock("never-ready", autoscaling={"min_replicas": 0, "max_replicas": 1},
                      start_delay_s=3600),
                _mock("flaky", fail_after_tokens=3),
            ],
            "server": {"cold_start_timeout_s": 20},
        },
        wait=False,
    )
    _wait_for(lambda: _running(c).get("auto", 0) >= 1 and _running(c).get("flaky", 0) >= 1 and _running(c).get("half-gpu", 0) >= 4, 300)
    yield c
    c.close()


def _status(c) -> dict:
    return httpx.get(c.base_url + "/v1/status", timeout=30).json()


def _running(c) -> dict:
    try:
        return {d["model"]: d["running"] for d in _status(c)["deployments"].values() if d["model"]}
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        return {}


def _wait_for(pred, timeout_s: float, every_s: float = 0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_half_gpu_replicas_share_gpus_and_the_fifth_is_pending(cluster):
    _wait_for(lambda: _status(cluster)["deployments"]["model-half-gpu"]["pending"] == 1, 60)
    dep = _status(cluster)["deployments"]["model-half-gpu"]
    assert dep["running"] == 4 and dep["pending"] == 1
    st = _status(cluster)
    assert st["cluster"]["total"]["GPU"] == 2 and st["cluster"]["available"].get("GPU", 0) == 0


def test_homefire_status_command_reports_the_pending_replica(cluster):
    import ray

    address = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "homefire.cli", "status", "--address", address], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "model-half-gpu" in out.stdout
    assert "1 replica(s) cannot be placed" in out.stdout and "GPU 0 free" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith("model-half-gpu"))
    assert row.split()[-3:] == ["4", "0", "1"]


def test_placed_half_gpu_replicas_still_serve(client):
    r = client.completions.create(model="half-gpu", prompt="hi", max_tokens=3)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("call, param", [
    (lambda c: c.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                         tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (lambda c: c.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                         logprobs=True), "logprobs"),
    (lambda c: c.completions.create(model="flaky", prompt="x", max_tokens=2, echo=True, logprobs=1), "echo"),
    (lambda c: c.responses.create(model="flaky", input="x"), "model"),
    (lambda c: c.embeddings.create(model="flaky", input="x"), "model"),
])
def test_what_an_engine_without_its_own_openai_layer_cannot_do_is_a_400_naming_the_field(client, call, param):
    with pytest.raises(openai.BadRequestError) as err:
        call(client)
    body = err.value.body
    assert body["param"] == param and "engine mock" in body["message"], body
    assert client.completions.create(model="flaky", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_autoscaling_adds_replicas_under_load_and_removes_them_when_idle(cluster, client):
    stop = threading.Event()
    errors: list[Exception] = []

    def load():
        while not stop.is_set():
            try:
                client.completions.create(model="auto", prompt="load", max_tokens=40)
            except Exception as e:  # collected and asserted below
                errors.append(e)
                return

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: _running(cluster).get("auto", 0) >= 2, 60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    _wait_for(lambda: _running(cluster).get("auto", 0) == 1, 90)


def test_scaled_to_zero_model_answers_first_request_after_a_bounded_wait(cluster, client):
    assert _running(cluster).get("zero", 0) == 0
    r = client.chat.completions.create(model="zero", messages=[{"role": "user", "content": "wake up"}], max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert _running(cluster)["zero"] == 1


def test_a_replica_that_never_starts_gives_a_503_after_the_cold_start_timeout(client):
    t0 = time.time()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="never-ready", prompt="x", max_tokens=1)
    assert e.value.status_code == 503
    assert "no replica ready within 20s" in str(e.value)
    assert 15 < time.time() - t0 < 60


def test_engine_failure_mid_stream_sends_an_error_event_and_done(cluster, client):
    with httpx.stream("POST", cluster.base_url + "/v1/completions", timeout=60,
                      json={"model": "flaky", "prompt": "x", "max_tokens": 10, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "mock engine failure" in err["message"]
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert len(texts) == 3
    # Non-streaming, the same failure is one error response; the service keeps serving afterwards.
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="flaky", prompt="x", max_tokens=10)
    assert client.completions.create(model="flaky", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_readiness_ignores_models_scaled_to_zero(cluster):
    r = httpx.get(cluster.base_url + "/ready", timeout=30)
    # half-gpu has 4 of 5 replicas running: it is serving, so the API is ready.
    assert r.status_code == 200, r.text


def test_sagemaker_container_contract(cluster):
    base = cluster.base_url
    assert httpx.get(base + "/ping", timeout=30).status_code == 200
    chat = httpx.post(base + "/invocations", timeout=60, json={
        "model": "half-gpu", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    assert chat.json()["usage"]["completion_tokens"] == 3
    text = httpx.post(base + "/invocations", timeout=60, json={"model": "half-gpu", "prompt": "hi", "max_tokens": 2})
    assert text.json()["object"] == "text_completion"
    bad = httpx.post(base + "/invocations", timeout=60, json={"model": "half-gpu", "prompt": "hi", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_azureml_score_route(cluster):
    r = httpx.post(cluster.base_url + "/score", timeout=60, json={"model": "half-gpu", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_vertex_ai_container_contract(cluster):
    base = cluster.base_url
    assert httpx.get(base + "/vertex/health", timeout=30).status_code == 200
    r = httpx.post(base + "/vertex/predict", timeout=60, json={"instances": [
        {"model": "half-gpu", "prompt": "a", "max_tokens": 2},
        {"model": "half-gpu", "messages": [{"role": "user", "content": "b"}], "max_tokens": 3},
    ]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["usage"]["completion_tokens"] for p in preds] == [2, 3]
    bad = httpx.post(base + "/vertex/predict", timeout=60, json={"instances": [{"model": "half-gpu", "prompt": "a", "top_p": 5}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "instances.0.top_p"
    assert httpx.post(base + "/vertex/predict", timeout=60, json={"rows": []}).json()["error"]["param"] == "instances"
