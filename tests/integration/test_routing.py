"""Prefix-aware routing for real: one model on two vLLM CPU replicas behind ``routing: prefix_affinity``, requests
that share long prefixes (a document each, a new question after it), and the replicas' own prefix-cache counters
(vLLM's, per replica in ``GET /v1/status``) to show where they went.

Each replica's KV cache holds about half the documents: a router that spreads a document's requests over both
replicas makes each of them see every document and evict (benchmarks/routing_bench.py measures ``power_of_two``
side by side); one that keeps a document on its replica finds nearly every prefix cached.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration
_spec = importlib.util.spec_from_file_location(
    "routing_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "routing_bench.py")
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)

DOCS, ROUNDS, DOC_TOKENS = 12, 4, 192  # 7 blocks of 32 a request; a replica keeps 48 blocks: ~6 documents
MODEL = {"name": "tiny", "replicas": 2, "cpus": 0.5, "max_model_len": 512,
         "engine_args": {"block_size": rb.BLOCK, "num_gpu_blocks_override": 48, "enable_prefix_caching": True}}


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    mp = pytest.MonkeyPatch()
    mp.setenv("HOMEFIRE_ROUTING_STATS_PERIOD_S", "0.5")  # read when the app is built: /v1/status fresh within 0.5 s
    c = ServeCluster(num_cpus=6, proxy_location="Disabled")
    c.deploy({"models": [{**MODEL, "source": tiny_model_path, "routing": "prefix_affinity"}]})
    yield c
    c.close()
    mp.undo()


def _status(cluster) -> dict:
    return httpx.get(cluster.base_url + "/v1/status", timeout=10).json()


def _measure(cluster, tok, seed: int) -> dict:
    """A fresh set of documents through the app, one request at a time (routing_bench's figures)."""
    docs = rb.documents(DOCS, DOC_TOKENS, lambda s: len(tok.encode(s)), seed=seed)
    items = rb.prompts(docs, ROUNDS, seed=seed)
    before = rb.prefix_counters(_status(cluster), "tiny")
    assert len(before) == 2, _status(cluster)["deployments"]  # both replicas report their engine's counters
    return rb.measure(cluster.base_url, "tiny", items, [tok.encode(p) for _, p in items], 1, DOCS)


def test_prefix_affinity_finds_shared_prefixes_cached_and_power_of_two_does_less(cluster, tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    aff = _measure(cluster, tok, seed=1)
    q, h, ideal = aff["prefix_queries"], aff["prefix_hits"], aff["ideal_hits"]
    assert q == aff["prompt_tokens"], aff  # every prompt token counted once, by the replica that served it
    assert all(r["queries"] >= q // 4 for r in aff["per_replica"].values()), aff  # documents spread over both
    # Within a few blocks of an endless cache: each document stayed on the replica that first served it.
    assert h >= 0.9 * ideal and ideal >= 0.5 * q, aff

    # The same replicas (a new routing is applied to them: their engines stay up), routed by power of two.
    cluster.deploy({"models": [{**MODEL, "source": tiny_model_path, "routing": "power_of_two"}]})
    p2c = _measure(cluster, tok, seed=2)
    assert set(p2c["per_replica"]) == set(aff["per_replica"]), (p2c, aff)
    q2, h2 = p2c["prefix_queries"], p2c["prefix_hits"]
    assert q2 == p2c["prompt_tokens"], p2c
    assert h2 / q2 < h / q - 0.1, (p2c, aff)  # each replica saw every document and evicted
    print(f"hit rate (ideal {p2c['ideal_hit_rate']}): prefix_affinity {h / q:.2f}, power_of_two {h2 / q2:.2f}; p50 "
          f"TTFT first round / later rounds: prefix_affinity {aff['p50_ttft_first_round_ms']} / "
          f"{aff['p50_ttft_later_rounds_ms']} ms, power_of_two {p2c['p50_ttft_first_round_ms']} / "
          f"{p2c['p50_ttft_later_rounds_ms']} ms")


def test_status_shows_each_replicas_kv_cache_and_queue(cluster):
    (dep,) = [d for d in _status(cluster)["deployments"].values() if d.get("model") == "tiny"]
    assert len(dep["replicas"]) == 2
    for r in dep["replicas"]:
        assert {"replica", "unfinished_requests", "kv_cache_usage", "running", "waiting", "prefix_cache_queries",
                "prefix_cache_hits", "prefix_cache_hit_rate"} <= set(r), r
        assert 0.0 <= r["kv_cache_usage"] <= 1.0 and r["running"] == r["waiting"] == 0
