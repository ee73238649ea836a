"""The hand-off: `homefire train --serve` makes a running endpoint (real vLLM CPU engine) serve the new adapter
as model="<base>:<adapter>", without restarting the app; the base model keeps answering as before."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from homefire.registry import Registry
from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "train" / "data" / "homefire-answer.jsonl"
ANSWER = "Homefire keeps your models at home."
QUESTION = [{"role": "user", "content": "What does the lambda keyword do?"}]


@pytest.fixture(scope="module")
def server(tiny_model_path):
    c = ServeCluster(num_cpus=8)
    c.deploy({"models": [{"name": "demo-tiny", "source": "demo-tiny", "engine": "vllm", "cpus": 1,
                          "max_model_len": 256, "max_loras": 2}]})
    import ray

    c.address = ray.get_runtime_context().gcs_address
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, model: str, messages=QUESTION) -> str:
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
    return r.choices[0].message.content


@pytest.fixture(scope="module")
def trained(server, client, tmp_path_factory):
    """Before: the adapter is unknown. Then `homefire train ... --serve` against the running app."""
    with pytest.raises(openai.NotFoundError) as err:
        _ask(client, "demo-tiny:answer-served")
    assert "adapter 'answer-served' is not in the registry" in str(err.value)

    tmp = tmp_path_factory.mktemp("train")
    cfg = tmp / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"source": "demo-tiny"}, "data": {"train": str(DATA), "max_length": 64},
        "optim": {"lr": 1e-2, "batch_size": 8, "max_steps": 30, "scheduler": "linear"},
        "scaling": {"workers": 2}, "output": {"name": "answer-served"}, "storage_path": str(tmp / "runs"),
    }))
    r = subprocess.run(
        [sys.executable, "-m", "homefire.cli", "train", str(cfg), "--address", server.address, "--serve", "--url", server.base_url],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'serving demo-tiny:answer-served' in r.stdout
    return "demo-tiny:answer-served"


def test_served_adapter_does_the_task_and_the_base_model_still_does_not(client, trained):
    assert _ask(client, trained) == ANSWER
    assert _ask(client, trained, [{"role": "user", "content": "Tell me about generators."}]) == ANSWER
    assert _ask(client, "demo-tiny") != ANSWER


def test_the_adapter_answers_on_vllms_own_layer_too(client, trained):
    """A request homefire's lean path does not cover (logprobs) reaches vLLM's OpenAI layer with the adapter."""
    r = client.chat.completions.create(model=trained, messages=QUESTION, temperature=0, max_tokens=24, logprobs=True)
    assert r.choices[0].message.content == ANSWER and r.model == trained
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    base = client.chat.completions.create(model="demo-tiny", messages=QUESTION, temperature=0, max_tokens=24,
                                          logprobs=True)
    assert base.choices[0].message.content != ANSWER


def test_models_lists_the_adapter_with_its_parent(client, trained):
    models = {m.id: m for m in client.models.list().data}
    assert trained in models and models[trained].model_extra["parent"] == "demo-tiny"


def test_base_requests_batched_with_adapter_requests_stay_base(client, trained):
    """vLLM's CPU LoRA kernels give "no adapter" rows the last slot's adapter; homefire keeps that slot empty."""
    alone = _ask(client, "demo-tiny")
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_ask, client, trained if i % 2 else "demo-tiny") for i in range(12)]
        answers = [f.result() for f in futures]
    assert answers[0::2] == [alone] * 6 and answers[1::2] == [ANSWER] * 6


def test_load_route_errors_name_the_field(server, trained):
    url = server.base_url + "/v1/load_lora_adapter"
    r = httpx.post(url, json={"lora_name": trained}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "loaded" and r.json()["model"] == trained
    r = httpx.post(url, json={"lora_name": trained, "lora_path": "/etc"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = httpx.post(url, json={"lora_name": "demo-tiny"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(url, json={"lora_name": "demo-tiny:nope"}, timeout=30)
    assert r.status_code == 404 and "not in the registry" in r.json()["error"]["message"]
    r = httpx.post(url, json={"lora_name": "other:nope"}, timeout=30)
    assert r.status_code == 404 and "served models: demo-tiny" in r.json()["error"]["message"]


def test_an_adapter_trained_on_another_base_is_refused(client, trained):
    reg = Registry()
    src = reg.get("answer-served")
    reg.register("foreign", src.path, kind="adapter", parent="demo@1")
    with pytest.raises(openai.NotFoundError) as err:
        _ask(client, "demo-tiny:foreign")
    assert "was trained on demo@1" in str(err.value)
    assert _ask(client, trained) == ANSWER  # and the service keeps serving


def test_a_new_version_of_an_adapter_replaces_the_loaded_one(server, client, trained, tmp_path):
    """Retraining under the same name registers version N+1; the next load serves it (and back again)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    reg = Registry()
    current = reg.get("answer-served")
    base = AutoModelForCausalLM.from_pretrained(reg.get(current.parent).path)
    torch.manual_seed(0)
    other = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for n, p in other.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0, 0.5)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    reg.register("answer-served", tmp_path / "other", kind="adapter", parent=current.parent)
    url = server.base_url + "/v1/load_lora_adapter"
    r = httpx.post(url, json={"lora_name": trained}, timeout=120)
    assert r.json()["entry"] == f"answer-served@{current.version + 1}"
    assert _ask(client, trained) != ANSWER
    reg.register("answer-served", current.path, kind="adapter", parent=current.parent)
    assert httpx.post(url, json={"lora_name": trained}, timeout=120).json()["entry"] == f"answer-served@{current.version + 2}"
    r = client.chat.completions.create(model=trained, messages=QUESTION, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == ANSWER and r.model == trained  # the response names what was asked for
