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


def _measure(cluster, tok, seed: int) -> tuple[dict, int, int, list[float]]:
    """A fresh set of documents through the app: (per-replica (queries, hits) deltas, ideal hits, prompt tokens,
    TTFTs)."""
    docs = rb.documents(DOCS, DOC_TOKENS, lambda s: len(tok.encode(s)), seed=seed)
    items = rb.prompts(docs, ROUNDS, seed=seed)
    token_lists = [tok.encode(p) for _, p in items]
    before = rb.prefix_counters(_status(cluster), "tiny")
    assert len(before) == 2, _status(cluster)["deployments"]  # both replicas report their engine's counters
    ttfts = rb.run_workload(cluster.base_url, "tiny", items, concurrency=1)
    queries = sum(len(t) for t in token_lists)
    after = rb.wait_for_counters(lambda: _status(cluster), "tiny", sum(q for q, _ in before.values()) + queries)
    return rb.counters_delta(before, after), rb.ideal_hits(token_lists), queries, ttfts


def _p50_ms(values: list[float]) -> float:
    return 1000 * sorted(values)[len(values) // 2]


def test_prefix_affinity_finds_shared_prefixes_cached_and_power_of_two_does_less(cluster, tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    delta, ideal, queries, ttfts = _measure(cluster, tok, seed=1)
    q, h = sum(v[0] for v in delta.values()), sum(v[1] for v in delta.values())
    assert q == queries, (delta, queries)  # every prompt token counted once, by the replica that served it
    assert all(v[0] >= queries // 4 for v in delta.values()), delta  # the documents spread over both replicas
    # Within a few blocks of an endless cache: each document stayed on the replica that first served it.
    assert h >= 0.9 * ideal and ideal >= 0.5 * q, (h, ideal, q, delta)
    affinity = (h / q, _p50_ms(ttfts[:DOCS]), _p50_ms(ttfts[DOCS:]))

    # The same replicas (a new routing is applied to them: their engines stay up), routed by power of two.
    replicas = set(delta)
    cluster.deploy({"models": [{**MODEL, "source": tiny_model_path, "routing": "power_of_two"}]})
    delta, ideal, queries, ttfts = _measure(cluster, tok, seed=2)
    assert set(delta) == replicas, (delta, replicas)
    q2, h2 = sum(v[0] for v in delta.values()), sum(v[1] for v in delta.values())
    assert q2 == queries
    assert h2 / q2 < affinity[0] - 0.1, (h2 / q2, affinity)  # each replica saw every document and evicted
    print(f"hit rate (ideal {ideal / q2:.2f}): prefix_affinity {affinity[0]:.2f}, power_of_two {h2 / q2:.2f}; p50 TTFT "
          f"first round / later rounds: prefix_affinity {affinity[1]:.1f} / {affinity[2]:.1f} ms, power_of_two "
          f"{_p50_ms(ttfts[:DOCS]):.1f} / {_p50_ms(ttfts[DOCS:]):.1f} ms")


def test_status_shows_each_replicas_kv_cache_and_queue(cluster):
    (dep,) = [d for d in _status(cluster)["deployments"].values() if d.get("model") == "tiny"]
    assert len(dep["replicas"]) == 2
    for r in dep["replicas"]:
        assert {"replica", "unfinished_requests", "kv_cache_usage", "running", "waiting", "prefix_cache_queries",
                "prefix_cache_hits", "prefix_cache_hit_rate"} <= set(r), r
        assert 0.0 <= r["kv_cache_usage"] <= 1.0 and r["running"] == r["waiting"] == 0
