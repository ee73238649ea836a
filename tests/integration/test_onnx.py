"""ONNX conversion (onnxruntime-genai's model builder) and the ONNX Runtime engine, on demo-tiny.

Each target is converted once per module; the engine runs in-process (no Ray): what is asserted is what a
client of the engine sees (text, finish reasons, token counts) against transformers on the source model.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from homefire.convert import convert
from homefire.errors import AdapterNotFound, ConfigError, InvalidRequest
from homefire.registry import Registry
from homefire.serve.config import model_config
from homefire.serve.engines import engine_class
from homefire.serve.engines.onnx import OnnxEngine
from homefire.serve.engines.protocol import Delta, SamplingSpec
from homefire.serve.engines.text import HFTokenizer

#: Held-out text (not from the tokenizer's corpus) for perplexity: ~470 tokens.
PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small tin of oil and a cloth "
    "for the great lens. From the gallery he could see the whole bay: the fishing boats returning in a loose line, "
    "the gulls settling on the breakwater, and the long shadow of the headland stretching across the water. He kept "
    "a notebook in which he wrote the time the lamp was lit, the state of the sea, and the direction of the wind. "
    "Most nights the entries were short and plain, but in winter, when storms came in from the west, he filled whole "
    "pages with careful notes about the height of the waves and the ships that passed too close to the rocks. Years "
    "later, when the light was automated and the keeper had moved inland, a historian found the notebooks in a box "
    "at the harbour office. She read them over a single weekend and was surprised to find not only weather and "
    "tides, but also small observations about the village: a wedding on the quay, a new bakery, the year the school "
    "got electric lights. The notebooks became a quiet record of a place changing slowly, seen from above by "
    "someone who was paid to watch the sea but could not help watching the people too."
)
PROMPT = "Classes and instances: a class definition"
NEW_TOKENS = 32
#: Measured on demo-tiny (random init, fp32 ppl ~3800): int8 1.001, int4 1.021. Bounds leave room for other
#: seeds of the tiny model while still failing a broken quantization (a wrong block layout gives ratios >> 2).
PPL_BOUNDS = {"onnx-int8": 1.02, "onnx-int4": 1.15}


def _cfg(**kw):
    return model_config({"name": "tiny-onnx", "source": "demo-tiny", "engine": "onnx", **kw})


async def _started(path: str, **kw) -> OnnxEngine:
    engine = OnnxEngine(_cfg(**kw), path)
    await engine.start(timeout_s=120)
    return engine


async def _collect(stream) -> list[Delta]:
    return [d async for d in stream]


def _texts(deltas: list[Delta], n: int = 1) -> list[str]:
    return ["".join(d.text for d in deltas if d.index == i) for i in range(n)]


def _finish(deltas: list[Delta], index: int = 0) -> str | None:
    return [d.finish_reason for d in deltas if d.index == index][-1]


def _ppl(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.fixture(scope="module")
def converted(tiny_model_ref):
    """demo-tiny in all three ONNX targets (registered in the test's isolated registry)."""
    return {to: convert(tiny_model_ref, to) for to in ("onnx-fp32", "onnx-int8", "onnx-int4")}


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """transformers on the source model: greedy continuation ids, per-token log-probs of PROMPT and PARAGRAPH."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = HFTokenizer(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    prompt = [1] + tok.encode(PROMPT)  # bos + text
    para = [1] + tok.encode(PARAGRAPH)

    def logprobs(ids: list[int]) -> list[float]:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "tok": tok, "prompt": prompt, "greedy": out[0, len(prompt):].tolist(),
        "prompt_logprobs": logprobs(prompt), "para": para, "para_ppl": _ppl(logprobs(para)),
    }


@pytest.fixture(scope="module")
def fp32_engine(converted):
    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(_started(converted["onnx-fp32"].path))
    yield loop, engine
    loop.run_until_complete(engine.shutdown())
    loop.close()


def test_fp32_entry_and_files(converted, tiny_model_path):
    entry = converted["onnx-fp32"]
    assert (entry.format, entry.kind, entry.parent) == ("onnx", "converted", Registry().get("demo-tiny").ref)
    assert entry.config["recipe"]["precision"] == "fp32" and entry.config["recipe"]["to"] == "onnx-fp32"
    files = {p.name for p in Path(entry.path).iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= files
    # The converted model renders chats exactly as the source does (same tokenizer files, same template).
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    assert HFTokenizer(entry.path).render_chat(messages) == HFTokenizer(tiny_model_path).render_chat(messages)
    assert engine_class("onnx") is OnnxEngine


def test_fp32_greedy_and_scores_match_transformers(fp32_engine, reference):
    loop, engine = fp32_engine
    ref = reference["greedy"]
    assert len(ref) >= 24, "the reference stopped early: pick a prompt that runs long"
    deltas = loop.run_until_complete(_collect(
        engine.generate("g", reference["prompt"], SamplingSpec(max_tokens=NEW_TOKENS, temperature=0))
    ))
    assert _texts(deltas)[0] == reference["tok"].decode(ref)
    assert sum(d.num_tokens for d in deltas) == len(ref)
    assert _finish(deltas) == ("length" if len(ref) == NEW_TOKENS else "stop")
    scores = loop.run_until_complete(engine.score(reference["prompt"], top_k=2)).logprobs
    assert len(scores) == len(reference["prompt"]) - 1
    assert max(abs(a - b) for a, b in zip(scores, reference["prompt_logprobs"])) < 1e-3


@pytest.mark.parametrize("to", ["onnx-int8", "onnx-int4"])
def test_quantized_perplexity_and_entry(converted, reference, to):
    entry = converted[to]
    precision = to.split("-")[1]
    assert (entry.format, entry.kind, entry.parent) == ("onnx", "quantized", Registry().get("demo-tiny").ref)
    recipe = entry.config["recipe"]
    assert (recipe["precision"], recipe["block_size"], recipe["accuracy_level"]) == (precision, 32, 1)
    assert entry.metrics["size_bytes"] < converted["onnx-fp32"].metrics["size_bytes"]

    async def ppl() -> float:
        engine = await _started(entry.path)
        try:
            return _ppl((await engine.score(reference["para"])).logprobs)
        finally:
            await engine.shutdown()

    ratio = asyncio.run(ppl()) / reference["para_ppl"]
    print(f"{to}: perplexity ratio to fp32 transformers {ratio:.4f} (fp32 ppl {reference['para_ppl']:.1f})")
    assert 1 / PPL_BOUNDS[to] < ratio < PPL_BOUNDS[to]


def test_stop_strings_n_and_seed(fp32_engine, reference):
    loop, engine = fp32_engine
    prompt = reference["prompt"]
    greedy = SamplingSpec(max_tokens=24, temperature=0)
    full = _texts(loop.run_until_complete(_collect(engine.generate("a", prompt, greedy))))[0]
    stop = full[12:15]
    deltas = loop.run_until_complete(_collect(
        engine.generate("b", prompt, SamplingSpec(max_tokens=24, temperature=0, stop=[stop]))
    ))
    assert _texts(deltas)[0] == full[:full.index(stop)] and _finish(deltas) == "stop"

    sampled = SamplingSpec(max_tokens=16, n=2, temperature=1.0, top_p=0.95, top_k=100, seed=11)
    first = loop.run_until_complete(_collect(engine.generate("c", prompt, sampled)))
    again = loop.run_until_complete(_collect(engine.generate("d", prompt, sampled)))
    other = loop.run_until_complete(_collect(engine.generate("e", prompt, replace(sampled, seed=12))))
    a, b = _texts(first, 2)
    assert a and b and a != b  # two choices, sampled independently
    assert _texts(again, 2) == [a, b]  # same seed, same text
    assert _texts(other, 2) != [a, b]
    assert {_finish(first, 0), _finish(first, 1)} <= {"stop", "length"}


def test_min_tokens_and_ignore_eos(converted, reference, tmp_path):
    """A copy whose end-of-sequence token is the 4th greedy token: it stops there unless min_tokens/ignore_eos."""
    path = tmp_path / "eos"
    shutil.copytree(converted["onnx-fp32"].path, path)
    genai = json.loads((path / "genai_config.json").read_text())
    genai["model"]["eos_token_id"] = reference["greedy"][3]
    (path / "genai_config.json").write_text(json.dumps(genai))

    async def run() -> list[list[Delta]]:
        engine = await _started(str(path))
        try:
            specs = [
                SamplingSpec(max_tokens=20, temperature=0),
                SamplingSpec(max_tokens=20, temperature=0, min_tokens=10),
                SamplingSpec(max_tokens=20, temperature=0, ignore_eos=True),
            ]
            return [await _collect(engine.generate(str(i), reference["prompt"], s)) for i, s in enumerate(specs)]
        finally:
            await engine.shutdown()

    plain, min_tokens, ignore = asyncio.run(run())
    assert sum(d.num_tokens for d in plain) == 4 and _finish(plain) == "stop"
    assert sum(d.num_tokens for d in min_tokens) >= 10
    assert sum(d.num_tokens for d in ignore) == 20 and _finish(ignore) == "length"


def test_structured_output(fp32_engine, reference):
    loop, engine = fp32_engine
    schema = {
        "type": "object", "additionalProperties": False, "required": ["size", "ok"],
        "properties": {"size": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    }
    spec = SamplingSpec(max_tokens=40, n=3, temperature=1.0, seed=5, json_schema=schema)
    deltas = loop.run_until_complete(_collect(engine.generate("j", reference["prompt"], spec)))
    for i, text in enumerate(_texts(deltas, 3)):
        value = json.loads(text)
        assert set(value) == {"size", "ok"} and 0 <= value["size"] <= 99 and isinstance(value["ok"], bool)
        assert _finish(deltas, i) == "stop"


def test_cancel_releases_the_slot_and_adapters_are_refused(converted, reference):
    async def run() -> None:
        engine = await _started(converted["onnx-fp32"].path, max_concurrency=1, threads=1)
        try:
            long = SamplingSpec(max_tokens=400, temperature=1.0, ignore_eos=True)
            stream = engine.generate("long", reference["prompt"], long)
            got = await stream.__anext__()
            assert got.num_tokens >= 1 and engine.stats()["running_sequences"] == 1
            await stream.aclose()  # the client went away
            assert engine.stats() == {"unfinished_requests": 0, "running_sequences": 0, "max_concurrency": 1}
            # The only slot is free again: a second request runs at once.
            short = await asyncio.wait_for(
                _collect(engine.generate("next", reference["prompt"], SamplingSpec(max_tokens=4, temperature=0))), 10
            )
            assert sum(d.num_tokens for d in short) == 4
            # A consumer task cancelled mid-stream does the same.
            task = asyncio.create_task(_collect(engine.generate("t", reference["prompt"], long)))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine.stats()["running_sequences"] == 0

            with pytest.raises(InvalidRequest, match="serves no LoRA adapters") as err:
                await _collect(engine.generate("x", reference["prompt"], SamplingSpec(max_tokens=2), adapter="sql"))
            assert err.value.param == "model"
            with pytest.raises(InvalidRequest):
                await engine.load_adapter("sql", "/nowhere")
            with pytest.raises(AdapterNotFound):
                await engine.unload_adapter("sql")
            assert engine.adapters() == [] and engine.adapter_path("sql") is None
        finally:
            await engine.shutdown()

    asyncio.run(run())


def test_tensorrt_on_a_cpu_box_names_the_gpu_need(converted):
    engine = OnnxEngine(_cfg(provider="tensorrt", gpus=1), converted["onnx-fp32"].path)
    with pytest.raises(ConfigError, match="provider 'tensorrt' needs an NVIDIA GPU"):
        asyncio.run(engine.start(timeout_s=30))
    assert engine.tokenizer is None  # refused before loading anything


def test_check_refusals_register_nothing(tmp_path, tiny_model_path):
    registry = Registry()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ConfigError, match="BertForMaskedLM"):
        convert(str(bert), "onnx-int4")
    assert registry.versions("bert-onnx-int4") == []

    # Passes check() but the builder fails (weights that are not safetensors): nothing registered, log tail shown.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="model builder failed") as err:
        convert(str(broken), "onnx-fp32")
    assert "its log ends" in str(err.value) and "SafetensorError" in str(err.value)  # the builder's own words
    assert registry.versions("broken-onnx-fp32") == []
    assert not list(registry.root.glob(".convert-*"))
