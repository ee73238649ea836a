"""vLLM's quantized formats (compressed-tensors W8A8 / W4A16, round-to-nearest): converted, loaded by the real vLLM
CPU build with the kernels it picks on this CPU, and scored against the fp32 model on held-out text.

Perplexity is measured by the engine that serves the variant (vLLM's prompt logprobs), never by a stand-in.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from homefire.convert import compressed, convert
from homefire.errors import ConfigError
from homefire.registry import Registry
from homefire.serve.config import model_config
from homefire.serve.engines.vllm import VLLMEngine, cpu_dtype

pytestmark = pytest.mark.integration

#: Held-out text (not in the tokenizer's corpus).
TEXT = (
    "A lighthouse keeper counts the ships that pass each night and writes their names in a small book. When the fog "
    "comes in from the sea, he lights the lamp early and listens for the horns of the boats. In spring the birds "
    "return to the cliffs, and the keeper repairs the fence that the winter storms have broken. "
) * 2
#: Perplexity ratio to fp32 transformers, measured on demo-tiny (random init, ppl ~3000-3600) on an AMX CPU: W8A8
#: 0.995, W4A16 0.98-1.003 (bf16 activations). vLLM's fp32 score equals transformers' within 1e-3 (test_engines_serve
#: checks greedy equality; the ONNX and GGUF tests check scores the same way).
#: The bounds fail a broken layout (wrong scales or packing give ratios far from 1) with room for other CPUs.
BOUNDS = {"vllm-w8a8": 0.05, "vllm-w4a16": 0.15}


async def _perplexity(path: str) -> tuple[float, str]:
    engine = VLLMEngine(model_config({"name": "q", "source": "demo-tiny", "max_model_len": 512, "kv_cache_gb": 0.25}),
                        path)
    await engine.start(timeout_s=300)
    try:
        ids = [1] + engine.tokenizer.encode(TEXT)
        scores = await engine.score(ids, top_k=3)
        logprobs = scores.logprobs
        assert len(logprobs) == len(ids) - 1 and len(scores.top) == len(logprobs)
        # vLLM's prompt logprobs by rank: 3 per position, the prompt's own token kept only in `logprobs`
        assert all(len(t) == 3 and max(t.values()) >= lp - 1e-6 for t, lp in zip(scores.top, logprobs))
        return math.exp(-sum(logprobs) / len(logprobs)), engine._engine.model_config.dtype
    finally:
        await engine.shutdown()


def _targets() -> list[str]:
    has_avx512 = "avx512f" in compressed.cpu_flags()
    return ["vllm-w8a8"] + (["vllm-w4a16"] if has_avx512 else [])


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """Perplexity of the fp32 model under transformers on the ids vLLM scores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = [1] + tok.encode(TEXT, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    return math.exp(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item())


@pytest.mark.parametrize("to", _targets())
def test_quantized_checkpoint_serves_with_bounded_perplexity_change(reference, tiny_model_ref, to):
    entry = convert(tiny_model_ref, to)
    assert entry.format == "compressed-tensors" and entry.parent == tiny_model_ref
    recipe = entry.config["recipe"]
    assert recipe["method"] == "round-to-nearest" and "lm_head" in recipe["full_precision_layers"]
    quant = json.loads((Path(entry.path) / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    # attention projections (128 wide) fit the kernels and are quantized; demo-tiny's 344-wide MLP does not
    assert not any("self_attn" in layer for layer in recipe["full_precision_layers"])
    ppl, dtype = asyncio.run(_perplexity(entry.path))
    ratio = ppl / reference
    print(f"{to}: perplexity {ppl:.1f} vs fp32 transformers {reference:.1f} (ratio {ratio:.4f}, vLLM dtype {dtype})")
    assert abs(ratio - 1) < BOUNDS[to], ratio
    assert str(dtype).removeprefix("torch.") == cpu_dtype(entry.path)


def test_w4a16_without_avx512_is_refused_naming_the_flag(tiny_model_path, monkeypatch):
    monkeypatch.setattr(compressed, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(compressed, "_has_cuda", lambda: False)
    before = [e.ref for e in Registry().list()]
    with pytest.raises(ConfigError) as e:
        convert("demo-tiny", "vllm-w4a16")
    assert "avx512f" in str(e.value) and "vllm-w8a8" in str(e.value)
    assert [e.ref for e in Registry().list()] == before
