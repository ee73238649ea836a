"""The pieces of prefix-affinity routing that need no cluster: what text a request routes by, the chained block
hashes, the per-replica prefix table, and the router config each `routing` choice deploys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from homefire.serve.routing import PrefixTable, _rendezvous, block_hashes, request_text, router_config


def test_request_text_reads_chat_messages_completion_prompts_and_native_bodies():
    chat = SimpleNamespace(messages=[SimpleNamespace(role="system", content="Be terse."),
                                     SimpleNamespace(role="user", content=[{"type": "text", "text": "hi"}])])
    assert request_text([chat, None]) == "<system>Be terse.<user>hi"
    assert request_text([SimpleNamespace(messages=None, prompt="once upon")]) == "once upon"
    native = SimpleNamespace(body={"messages": [{"role": "user", "content": "x"}]})
    assert request_text([native]) == "<user>x"
    assert request_text([SimpleNamespace(body={"input": "embed me"})]) == "embed me"
    assert request_text([SimpleNamespace(messages=None, prompt=[1, 2, 3])]) == ""  # token ids: no affinity
    assert request_text([]) == ""


def test_block_hashes_are_shared_exactly_as_far_as_the_prefix_is():
    a, b = "x" * 300 + "tail-a", "x" * 256 + "y" * 44 + "tail-b"
    ha, hb = block_hashes(a, 128), block_hashes(b, 128)
    assert len(ha) == len(hb) == 2  # whole blocks only
    assert ha[0] == hb[0] and ha[1] == hb[1]  # the first 256 chars are equal
    hc = block_hashes("x" * 128 + "z" * 128, 128)
    assert hc[0] == ha[0] and hc[1] != ha[1]
    assert block_hashes("short", 128) == []


def test_prefix_table_matches_the_longest_held_prefix_and_evicts_chains_from_their_end():
    table = PrefixTable(capacity=4)
    doc = block_hashes("abcd" * 96, 64)  # 6 blocks
    table.add(doc[:3])
    assert table.matched(doc) == 3 and table.matched(doc[:2]) == 2
    assert table.matched(block_hashes("zzzz" * 96, 64)) == 0
    other = block_hashes("wxyz" * 32, 64)  # 2 blocks: the table holds 5 > 4, the deepest of `doc` goes first
    table.add(other)
    assert len(table) == 4
    assert table.matched(other) == 2 and table.matched(doc) == 2


def test_sessions_rank_replicas_the_same_everywhere_and_a_lost_replica_moves_only_its_own():
    replicas = [f"r{i}" for i in range(4)]
    home = {u: max(replicas, key=lambda r: _rendezvous(u, r)) for u in (f"user-{i}" for i in range(200))}
    assert len(set(home.values())) == 4  # spread
    survivors = [r for r in replicas if r != "r0"]
    for user, r in home.items():
        moved = max(survivors, key=lambda s: _rendezvous(user, s))
        assert moved == r or r == "r0"


@pytest.mark.parametrize("routing, cls, kwargs", [
    ("power_of_two", "PowerOfTwoRouter", {}),
    ("prefix_affinity", "PrefixAffinityRouter", {}),
    ("session", "PrefixAffinityRouter", {"sessions": True}),
])
def test_router_config_names_an_importable_router_serve_accepts(routing, cls, kwargs, monkeypatch):
    from ray._common.utils import import_attr
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import RequestRouter

    monkeypatch.setenv("HOMEFIRE_ROUTING_STATS_PERIOD_S", "0.5")
    cfg = router_config(routing)
    assert cfg["request_router_class"].endswith(f":{cls}") and cfg["request_router_kwargs"] == kwargs
    assert cfg["request_routing_stats_period_s"] == 0.5
    assert issubclass(import_attr(cfg["request_router_class"]), RequestRouter)
    RequestRouterConfig(**cfg)  # Serve's own validation


def test_vllm_engine_stats_sum_the_schedulers_prefix_counters_and_keep_its_latest_gauges():
    from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats

    from homefire.serve.engines.vllm import EngineStats

    stats = EngineStats()
    assert stats.as_dict()["prefix_cache_hit_rate"] is None  # nothing asked yet: no rate, not 0
    logger = stats.logger_factory()(vllm_config=None, engine_index=0)  # as vLLM builds it, per engine core
    logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.25,
                                 prefix_cache_stats=PrefixCacheStats(requests=1, queries=190, hits=0)), None)
    logger.record(None, None)  # a step without scheduler stats changes nothing
    logger.record(SchedulerStats(num_running_reqs=1, kv_cache_usage=0.125,
                                 prefix_cache_stats=PrefixCacheStats(requests=1, queries=190, hits=160)), None)
    assert stats.as_dict() == {"kv_cache_usage": 0.125, "running": 1, "waiting": 0, "prefix_cache_queries": 380,
                               "prefix_cache_hits": 160, "prefix_cache_hit_rate": 0.4211}


def test_routers_register_where_status_looks_even_when_pickled_by_value():
    """Serve may ship the router class to the ingress pickled by value (rebuilt in that process with globals of its
    own): the router must still land in the module's table that GET /v1/status reads."""
    import subprocess
    import sys

    from ray import cloudpickle

    import homefire.serve.routing as routing

    cloudpickle.register_pickle_by_value(routing)
    try:
        blob = cloudpickle.dumps(routing.PowerOfTwoRouter)
    finally:
        cloudpickle.unregister_pickle_by_value(routing)
    check = (
        "import sys; from types import SimpleNamespace; from ray import cloudpickle; "
        "import homefire.serve.routing as routing; cls = cloudpickle.loads(sys.stdin.buffer.read()); "
        "assert cls is not routing.PowerOfTwoRouter; r = cls.__new__(cls); "
        "r._deployment_id = SimpleNamespace(name='model-x'); r._replicas = {}; r._register(); "
        "print(routing.replica_stats('model-x'))"
    )
    out = subprocess.run([sys.executable, "-c", check], input=blob, capture_output=True, timeout=120)
    assert out.returncode == 0 and out.stdout.decode().strip() == "[]", out.stderr.decode()[-2000:]


def test_a_new_routing_or_replica_count_keeps_the_replicas_and_anything_else_restarts_them():
    from homefire.serve.builders import code_version
    from homefire.serve.config import model_config

    def version(**over):
        m = model_config({"name": "m", "source": "demo-tiny", **over})
        return code_version((m.model_dump(mode="json"), "/models/m", 0.05, "file:///reg", "demo-tiny@1"))

    base = version()
    assert version(routing="prefix_affinity") == version(replicas=3) == base
    assert version(max_model_len=256) != base and version(engine_args={"block_size": 32}) != base
