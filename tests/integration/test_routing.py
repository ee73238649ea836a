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

DOCS, ROUNDS, DOC_TOKENS = 8, 4, 192  # 6 blocks of 32 each; a replica keeps 40 blocks: ~5 documents' requests


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    mp = pytest.MonkeyPatch()
    mp.setenv("HOMEFIRE_ROUTING_STATS_PERIOD_S", "0.5")  # read when the app is built: /v1/status fresh within 0.5 s
    c = ServeCluster(num_cpus=6, proxy_location="Disabled")
    c.deploy({"models": [{
        "name": "tiny", "source": tiny_model_path, "replicas": 2, "cpus": 0.5, "max_model_len": 512,
        "routing": "prefix_affinity",
        "engine_args": {"block_size": rb.BLOCK, "num_gpu_blocks_override": 40, "enable_prefix_caching": True},
    }]})
    yield c
    c.close()
    mp.undo()


def test_requests_sharing_a_prefix_find_it_cached_on_their_replica(cluster, tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    docs = rb.documents(DOCS, DOC_TOKENS, lambda s: len(tok.encode(s)))
    items = rb.prompts(docs, ROUNDS)
    token_lists = [tok.encode(p) for _, p in items]
    status = lambda: httpx.get(cluster.base_url + "/v1/status", timeout=10).json()  # noqa: E731
    before = rb.prefix_counters(status(), "tiny")
    assert len(before) == 2, status()["deployments"]  # both replicas report their engine's counters

    ttfts = rb.run_workload(cluster.base_url, "tiny", items, concurrency=1)
    queries = sum(len(t) for t in token_lists)
    after = rb.wait_for_counters(status, "tiny", sum(q for q, _ in before.values()) + queries)
    delta = rb.counters_delta(before, after)
    q, h = sum(v[0] for v in delta.values()), sum(v[1] for v in delta.values())
    ideal = rb.ideal_hits(token_lists)

    assert q == queries, (delta, queries)  # every prompt token counted once, by the replica that served it
    assert all(v[0] >= queries // 4 for v in delta.values()), delta  # the documents spread over both replicas
    # Within a few blocks of an endless cache: each document stayed on the replica that first served it.
    assert h >= 0.9 * ideal and ideal >= 0.5 * q, (h, ideal, q, delta)
    print(f"prefix_affinity: hit rate {h / q:.2f} (ideal {ideal / q:.2f}), per replica {delta}; p50 TTFT first round "
          f"{1000 * sorted(ttfts[:DOCS])[DOCS // 2]:.1f} ms, later rounds {1000 * sorted(ttfts[DOCS:])[len(ttfts[DOCS:]) // 2]:.1f} ms")


def test_status_shows_each_replicas_kv_cache_and_queue(cluster):
    st = httpx.get(cluster.base_url + "/v1/status", timeout=10).json()
    (dep,) = [d for d in st["deployments"].values() if d.get("model") == "tiny"]
    assert len(dep["replicas"]) == 2
    for r in dep["replicas"]:
        assert {"replica", "unfinished_requests", "kv_cache_usage", "running", "waiting", "prefix_cache_queries",
                "prefix_cache_hits", "prefix_cache_hit_rate"} <= set(r), r
        assert 0.0 <= r["kv_cache_usage"] <= 1.0 and r["running"] == r["waiting"] == 0
