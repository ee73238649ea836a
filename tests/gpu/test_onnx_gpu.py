"""The ONNX Runtime engine on an NVIDIA GPU (skipped without CUDA): the same onnx-fp32 entry served with
``provider: cuda`` (onnxruntime-genai-cuda) and ``provider: tensorrt`` (TensorRT-RTX execution provider) gives
the CPU provider's greedy text.

Needs ``pip install 'homefire[tensorrt]'`` on the GPU machine.
"""

from __future__ import annotations

import asyncio

import pytest

from homefire.convert import convert
from homefire.serve.config import model_config
from homefire.serve.engines.onnx import OnnxEngine
from homefire.serve.engines.protocol import SamplingSpec

pytestmark = pytest.mark.gpu


async def _greedy(path: str, provider: str) -> tuple[str, int]:
    gpus = 0 if provider == "cpu" else 1
    cfg = model_config({"name": "tiny", "source": "demo-tiny", "engine": "onnx", "provider": provider, "gpus": gpus})
    engine = OnnxEngine(cfg, path)
    await engine.start(timeout_s=600)  # TensorRT builds its engine on first load
    try:
        prompt = [1] + engine.tokenizer.encode("Classes and instances: a class definition")
        deltas = [d async for d in engine.generate("g", prompt, SamplingSpec(max_tokens=32, temperature=0))]
        return "".join(d.text for d in deltas), sum(d.num_tokens for d in deltas)
    finally:
        await engine.shutdown()


@pytest.fixture(scope="module")
def fp32(tiny_model_ref) -> str:
    return convert(tiny_model_ref, "onnx-fp32").path


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_greedy_equals_cpu(fp32, provider):
    cpu_text, cpu_tokens = asyncio.run(_greedy(fp32, "cpu"))
    gpu_text, gpu_tokens = asyncio.run(_greedy(fp32, provider))
    assert cpu_tokens >= 24
    assert (gpu_text, gpu_tokens) == (cpu_text, cpu_tokens)
