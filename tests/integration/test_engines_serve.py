"""One config, three engines: vLLM (hf), ONNX Runtime (onnx-*) and llama.cpp (gguf-*) serve variants of the same
model side by side behind one OpenAI API, through the official client. (vLLM's compressed-tensors checkpoints run on
the same vLLM engine; tests/integration/test_vllm_quant.py serves them, and test_tune.py serves sweep winners.)

Lossless formats must answer token for token what vLLM answers; quantized ones must answer at all, with the
same API behaviour (streaming with usage, n, stop, seed); what an engine cannot do is a 400 naming the field.
"""

from __future__ import annotations

import json

import pytest

from homefire.convert import convert
from homefire.errors import ConfigError
from homefire.registry import Registry
from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration

PROMPT = "The built-in functions of the language"
VARIANTS = {  # served name -> (engine, conversion target or None for the hf model itself)
    "tiny": ("vllm", None),
    "tiny-onnx": ("onnx", "onnx-fp32"),
    "tiny-gguf": ("llamacpp", "gguf-f32"),
    "tiny-int4": ("onnx", "onnx-int4"),
    "tiny-q8": ("llamacpp", "gguf-q8_0"),
}
QUANTIZED = ["tiny-int4", "tiny-q8"]


@pytest.fixture(scope="module")
def entries(tiny_model_path):
    return {to: convert("demo-tiny", to) for _, to in VARIANTS.values() if to is not None}


@pytest.fixture(scope="module")
def cluster(entries):
    models = []
    for name, (engine, to) in VARIANTS.items():
        m = {"name": name, "engine": engine, "source": entries[to].ref if to else "demo-tiny", "max_model_len": 256}
        if engine == "vllm":
            m.update(cpus=1, kv_cache_gb=0.25)
        else:
            m.update(cpus=0.25)
        models.append(m)
    c = ServeCluster(num_cpus=8)
    c.deploy({"models": models})
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_every_variant_is_listed(client):
    assert sorted(m.id for m in client.models.list().data) == sorted(VARIANTS)


def test_lossless_formats_answer_token_for_token_what_vllm_answers(client):
    texts = {}
    for name in ("tiny", "tiny-onnx", "tiny-gguf"):
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
        texts[name] = out.choices[0].text
        assert out.usage.completion_tokens == 24 or out.choices[0].finish_reason == "stop"
    assert texts["tiny"], texts
    assert texts["tiny-onnx"] == texts["tiny"] and texts["tiny-gguf"] == texts["tiny"], texts


@pytest.mark.parametrize("name", [*QUANTIZED, "tiny-onnx", "tiny-gguf"])
def test_chat_stream_with_usage_matches_non_stream(client, name):
    msgs = [{"role": "user", "content": "What is a list?"}]
    full = client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model=name, messages=msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens > 0
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 0


@pytest.mark.parametrize("name", QUANTIZED)
def test_n_seed_and_stop_behave_as_on_vllm(client, name):
    kw = dict(model=name, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7)
    two = client.completions.create(n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.completions.create(**kw)
    assert again.choices[0].text == client.completions.create(**kw).choices[0].text
    greedy = client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = greedy.strip().split()[1]
    cut = client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert greedy.startswith(cut.choices[0].text)


def test_what_an_engine_cannot_do_is_a_400_naming_the_field(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="tiny-q8:some-adapter", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model" and "LoRA" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:  # ONNX Runtime GenAI has no presence / frequency penalties
        client.completions.create(model="tiny-int4", prompt=PROMPT, max_tokens=4, presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty" and e.value.body["code"] == "unsupported_by_engine"
    for name in QUANTIZED:  # and the service keeps serving
        assert client.completions.create(model=name, prompt=PROMPT, max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("name", QUANTIZED)
def test_structured_output_on_every_engine(client, name):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    msgs = [{"role": "user", "content": "yes or no?"}]
    out = client.chat.completions.create(model=name, messages=msgs, max_tokens=40, response_format=fmt)
    assert json.loads(out.choices[0].message.content)["answer"] in ("yes", "no")


def test_a_format_the_engine_cannot_run_is_refused_when_the_config_loads(entries):
    from homefire.serve.builders import resolve_model
    from homefire.serve.config import model_config

    reg = Registry()
    gguf = entries["gguf-q8_0"].ref
    with pytest.raises(ConfigError) as e:
        resolve_model(model_config({"name": "x", "source": gguf, "engine": "vllm"}), reg)
    assert "is a gguf model" in str(e.value) and "engine: llamacpp" in str(e.value)
    with pytest.raises(ConfigError) as e:
        resolve_model(model_config({"name": "x", "source": "demo-tiny", "engine": "onnx"}), reg)
    assert "homefire models convert demo-tiny --to onnx-int4" in str(e.value)


def test_variants_are_listed_under_their_parent(entries, capsys):
    from homefire.cli import main

    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    base = next(i for i, line in enumerate(lines) if line.startswith("demo-tiny@"))
    children = [line for line in lines[base + 1:] if line.startswith("  ")]
    assert {line.split()[0] for line in children} >= {e.ref for e in entries.values()}
    assert any("gguf" in line and "quantized" in line for line in children)


def test_converting_again_reuses_the_entry_unless_forced(entries):
    again = convert("demo-tiny", "gguf-q8_0")
    assert again.ref == entries["gguf-q8_0"].ref
    forced = convert("demo-tiny", "gguf-q8_0", force=True)
    assert forced.version == again.version + 1 and forced.recipe_hash == again.recipe_hash
