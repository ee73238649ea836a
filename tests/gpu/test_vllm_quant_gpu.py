"""vLLM's quantized formats on CUDA (skipped without a GPU): the vllm-w8a8 entry that the CPU tests serve loads in
CUDA vLLM (CUTLASS int8 kernels) with its perplexity within the CPU bound of the fp32 model; vllm-fp8 (GPU only)
likewise, on fp8 GEMMs (compute capability 8.9+) or Marlin.

Needs ``pip install 'homefire[gpu]'`` on the GPU machine.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from homefire.convert import convert
from homefire.serve.config import model_config
from homefire.serve.engines.vllm import VLLMEngine
from tests.integration.test_vllm_quant import BOUNDS, TEXT

pytestmark = pytest.mark.gpu


async def _perplexity(path: str) -> float:
    cfg = model_config({"name": "q", "source": "demo-tiny", "gpus": 0.3, "max_model_len": 512, "dtype": "float16"})
    engine = VLLMEngine(cfg, path)
    await engine.start(timeout_s=600)
    try:
        logprobs = (await engine.score([1] + engine.tokenizer.encode(TEXT))).logprobs
        return math.exp(-sum(logprobs) / len(logprobs))
    finally:
        await engine.shutdown()


def test_w8a8_on_cuda_stays_close_to_fp16(tiny_model_path, tiny_model_ref):
    w8a8 = convert(tiny_model_ref, "vllm-w8a8")
    base, quantized = asyncio.run(_perplexity(tiny_model_path)), asyncio.run(_perplexity(w8a8.path))
    assert abs(quantized / base - 1) < BOUNDS["vllm-w8a8"], (quantized, base)


def test_fp8_on_cuda_stays_close_to_fp16(tiny_model_path, tiny_model_ref):
    fp8 = convert(tiny_model_ref, "vllm-fp8")
    assert fp8.config["recipe"]["format"] == "float-quantized"
    base, quantized = asyncio.run(_perplexity(tiny_model_path)), asyncio.run(_perplexity(fp8.path))
    assert abs(quantized / base - 1) < BOUNDS["vllm-w8a8"], (quantized, base)
