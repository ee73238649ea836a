"""The capacity planner against vLLM itself: a demo model of the shipped default config, started once on the real
vLLM CPU engine as homefire starts it; the KV-cache tokens and maximum concurrency vLLM reports at start-up (its own
numbers, and its log line) equal the planner's within 5 %."""

from __future__ import annotations

import asyncio
import re

import pytest

from homefire.registry import Registry
from homefire.serve.builders import DEFAULT_CONFIG, app_config_from_file
from homefire.serve.config import AppConfig
from homefire.serve.engines.vllm import VLLMEngine
from homefire.serve.plan import plan_app

pytestmark = pytest.mark.integration

#: vLLM's start-up line (vllm/v1/core/kv_cache_utils.py, update_kv_cache_capacity).
LOG = re.compile(r"CPU KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
                 r"([\d.]+)x")


async def _vllm_figures(model, path: str) -> tuple[int, float, int]:
    engine = VLLMEngine(model, path)
    await engine.start(timeout_s=300)
    try:
        cache = engine.client.vllm_config.cache_config
        return cache.kv_cache_size_tokens, cache.kv_cache_max_concurrency, engine.max_model_len
    finally:
        await engine.shutdown()


def test_planner_kv_tokens_and_concurrency_match_vllm_at_start_up(tiny_model_path, monkeypatch, capfd):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # the engine sets it from kv_cache_gb, as in a replica
    shipped = next(m for m in app_config_from_file(DEFAULT_CONFIG).models if m.name == "demo-tiny")
    # The shipped entry (LoRA slots and all) with 2 GiB of KV cache and a context that is no whole number of
    # vLLM's 128-token blocks, so the GiB, the block rounding and vLLM's int(concurrency x max_model_len) all show.
    model = shipped.model_copy(update={"source": tiny_model_path, "kv_cache_gb": 2.0, "max_model_len": 448})
    (plan,) = plan_app(AppConfig(models=[model]), {}, registry=Registry())
    (row,) = plan.rows
    assert (row.target, row.kv_space_gib_per_gpu, plan.kv_bytes_per_token) == ("cpu", 2, 2 * 2 * 2 * 64 * 4)
    assert (row.kv_blocks, row.max_concurrency, row.kv_tokens) == (8192, 2048.0, 917_504)  # 4 blocks per request

    tokens, concurrency, max_len = asyncio.run(_vllm_figures(model, tiny_model_path))

    captured = capfd.readouterr()
    print(f"vLLM: {tokens:,} tokens, {concurrency:.2f}x at {max_len}; planner: {row.kv_tokens:,} tokens, "
          f"{row.max_concurrency:.2f}x")
    assert max_len == plan.settings["max_model_len"] == 448
    assert tokens == pytest.approx(row.kv_tokens, rel=0.05)
    assert concurrency == pytest.approx(row.max_concurrency, rel=0.05)
    logged = LOG.findall(captured.out + captured.err)
    assert logged, "vLLM logged no KV-cache size line"
    log_tokens, log_len, log_conc = logged[-1]
    assert int(log_len.replace(",", "")) == max_len
    assert int(log_tokens.replace(",", "")) == pytest.approx(row.kv_tokens, rel=0.05)
    assert float(log_conc) == pytest.approx(row.max_concurrency, rel=0.05)
