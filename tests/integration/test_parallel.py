"""One model over several vLLM workers, for real, on this CPU box: vLLM's CPU build runs ``tensor_parallel: 2`` and
``pipeline_parallel: 2`` with its mp executor, each worker on its own core (homefire sets
``VLLM_CPU_OMP_THREADS_BIND`` to "0|1"), TP's all-reduce over vLLM's shared-memory communicator (PP on CPU with
homefire's workaround for vLLM's skipped warm-up, see ``serve/engines/vllm.py``). Served by homefire and asked through
the official ``openai`` client, greedy output equals the single-worker engine's on the same model.

The engines are shared by the module: one app, three deployments of the same offline tiny Llama (2 attention heads,
2 KV heads, 2 layers: TP 2 gives each worker one head, PP 2 each stage one layer).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration

CONTEXT = 256
PROMPTS = ["The for statement", "import", "A class definition", "Exceptions are raised when"]


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    c = ServeCluster(num_cpus=4)
    c.deploy({"models": [
        {"name": "tp1", "source": tiny_model_path, "max_model_len": CONTEXT},
        {"name": "tp2", "source": tiny_model_path, "max_model_len": CONTEXT, "tensor_parallel": 2},
        {"name": "pp2", "source": tiny_model_path, "max_model_len": CONTEXT, "pipeline_parallel": 2},
    ]})
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _greedy(client, model: str, prompt: str) -> tuple[str, int]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
    return r.choices[0].text, r.usage.completion_tokens


@pytest.mark.parametrize("model", ["tp2", "pp2"])
def test_greedy_completions_equal_the_single_worker_engines(client, model):
    for prompt in PROMPTS:
        one = _greedy(client, "tp1", prompt)
        assert one[1] == 32 and one[0]
        assert _greedy(client, model, prompt) == one, prompt


@pytest.mark.parametrize("model", ["tp2", "pp2"])
def test_greedy_chat_stream_equals_the_single_worker_engines(client, model):
    messages = [{"role": "user", "content": "Name a Python keyword."}]

    def text(m):
        chunks = client.chat.completions.create(model=m, messages=messages, max_tokens=24, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(model) == text("tp1") != ""


def _workers(cluster, deployment: str) -> list[tuple[str, list[int]]]:
    """(process title vLLM gives it, the cores its main thread, OpenMP's first, may run on) of each worker process
    under that deployment's replica."""
    import psutil
    import ray
    from ray.util.state import list_actors

    (actor,) = list_actors(address=ray.get_runtime_context().gcs_address,
                           filters=[("class_name", "=", f"ServeReplica:homefire:{deployment}"), ("state", "=", "ALIVE")])
    out = []
    for proc in psutil.Process(actor.pid).children(recursive=True):
        title = " ".join(proc.cmdline()).strip()
        if title.startswith("VLLM::Worker"):
            out.append((title, sorted(proc.cpu_affinity())))
    return sorted(out)


def _workers_when(cluster, deployment: str, expected, timeout_s: float = 60.0):
    """The workers once they match ``expected`` (a replica replacing its engine in place has none for a while; one
    CI run read none once), else the last reading."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = _workers(cluster, deployment)
        if expected(got) or time.monotonic() > deadline:
            return got
        time.sleep(1)


def test_each_replica_runs_its_workers_as_processes_bound_to_their_own_cores(cluster):
    tp2 = [("VLLM::Worker_TP0", [0]), ("VLLM::Worker_TP1", [1])]
    assert _workers_when(cluster, "model-tp2", lambda w: w == tp2) == tp2
    pp2 = [("VLLM::Worker_PP0", [0]), ("VLLM::Worker_PP1", [1])]
    assert _workers_when(cluster, "model-pp2", lambda w: w == pp2) == pp2
    assert [t for t, _ in _workers_when(cluster, "model-tp1", lambda w: len(w) == 1)] == ["VLLM::Worker"]


def test_status_shows_each_parallel_replicas_placement_group(cluster):
    st = httpx.get(cluster.base_url + "/v1/status", timeout=30).json()
    for name in ("model-tp2", "model-pp2"):
        (pg,) = st["deployments"][name]["placement_groups"]
        assert pg["state"] == "CREATED" and pg["strategy"] == "STRICT_PACK"
        assert pg["bundles"] == [{"CPU": 0.5}, {"CPU": 0.5}] and len(set(pg["nodes"])) == 1
    assert "placement_groups" not in st["deployments"]["model-tp1"]
