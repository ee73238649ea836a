"""Parallel models in the config: tensor_parallel / pipeline_parallel / placement_strategy, what a replica asks Ray
for, and the refusals at load time (naming the key, the value and the fix)."""

from __future__ import annotations

import logging

import pytest

from homefire.config import validate_config
from homefire.errors import ConfigError, EngineError
from homefire.serve.builders import _model_options
from homefire.serve.config import AppConfig


def _model(**kw):
    return validate_config(AppConfig, {"models": [{"name": "m", "source": "demo-tiny", **kw}]}, "t.yaml").models[0]


def _err(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        _model(**kw)
    return str(e.value)


# ------------------------------------------------------------------ what a replica asks Ray for
def test_one_worker_needs_no_placement_group():
    m = _model(gpus=0.5)
    assert (m.tp, m.workers) == (1, 1)
    opts = _model_options(m, 30)
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5} and "placement_group_bundles" not in opts


def test_cpu_tensor_parallel_is_one_cpu_bundle_per_worker_on_one_node_with_the_mp_executor():
    m = _model(tensor_parallel=2, cpus=2)
    p = m.placement()
    assert p.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] and p.strategy == "STRICT_PACK" and p.backend == "mp"
    assert p.actor == {"num_cpus": 1.0, "num_gpus": 0}  # the replica lives in bundle 0
    opts = _model_options(m, 30)
    assert opts["placement_group_bundles"] == p.bundles and opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"] == p.actor


def test_cpu_pipeline_parallel_stays_on_one_node_too():
    m = _model(pipeline_parallel=2)
    assert m.strategy == "STRICT_PACK" and m.placement().bundles == [{"CPU": 0.5}, {"CPU": 0.5}]


def test_gpus_on_one_node_are_held_by_the_replica_for_vllms_mp_executor():
    m = _model(source="meta-llama/Llama-3.1-70B-Instruct", gpus=4, tensor_parallel=4, cpus=8)
    p = m.placement()
    assert m.strategy == "STRICT_PACK" and p.backend == "mp"
    assert p.bundles == [{"CPU": 8.0, "GPU": 4.0}] and p.actor == {"num_cpus": 8.0, "num_gpus": 4.0}


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_SPREAD"])
def test_gpus_across_nodes_are_one_gpu_bundle_per_worker_for_vllms_ray_executor(strategy):
    m = _model(source="meta-llama/Llama-3.1-70B-Instruct", gpus=4, tensor_parallel=2, pipeline_parallel=2,
               placement_strategy=strategy)
    p = m.placement()
    assert p.bundles == [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert p.strategy == strategy and p.backend == "ray" and p.actor == {"num_cpus": 1.0, "num_gpus": 0}


def test_pipeline_parallel_on_gpus_defaults_to_pack():
    m = _model(source="meta-llama/Llama-3.1-70B-Instruct", gpus=4, pipeline_parallel=2)
    assert (m.tp, m.pipeline_parallel, m.strategy, m.placement().backend) == (2, 2, "PACK", "ray")


def test_gpus_alone_means_tensor_parallel_over_them():
    m = _model(source="meta-llama/Llama-3.1-70B-Instruct", gpus=4)
    assert (m.tensor_parallel, m.tp, m.workers) == (None, 4, 4)


def test_the_mock_engine_takes_the_same_placement():
    m = _model(engine="mock", gpus=4, tensor_parallel=4, placement_strategy="PACK")
    assert len(m.placement().bundles) == 4  # no head-count check: the mock shards nothing


# ------------------------------------------------------------------ refusals
def test_tensor_parallel_that_does_not_divide_the_heads_is_refused_with_the_sizes_that_do():
    msg = _err(tensor_parallel=3)  # demo-tiny: 2 heads, 2 KV heads
    assert "models.0.tensor_parallel: 3 does not split model 'm' (2 attention heads, 2 KV heads" in msg
    assert "fix: tensor_parallel: one of 1, 2" in msg


def test_tensor_parallel_that_does_not_divide_the_kv_heads_is_refused():
    # Llama 3.1 8B: 32 heads, 8 KV heads. TP 16 divides the heads and is a multiple of the KV heads (vLLM then
    # replicates each KV head on two workers); TP 6 divides neither.
    assert _model(source="meta-llama/Llama-3.1-8B-Instruct", tensor_parallel=16).tp == 16
    msg = _err(source="meta-llama/Llama-3.1-8B-Instruct", tensor_parallel=6)
    assert "32 attention heads, 8 KV heads" in msg and "one of 1, 2, 4, 8, 16, 32" in msg


def test_gpus_that_imply_a_bad_tensor_parallel_name_gpus():
    msg = _err(gpus=4)  # 4 workers for a 2-head model
    assert "models.0.gpus: 4 runs tensor_parallel 4 (tensor_parallel is unset)" in msg
    assert "one of 1, 2 and gpus to match" in msg


def test_more_pipeline_stages_than_layers_is_refused():
    msg = _err(pipeline_parallel=3)  # demo-tiny has 2 layers
    assert "models.0.pipeline_parallel: 3 stages for the 2 layers" in msg and "leave a stage without layers" in msg
    assert "fix: pipeline_parallel <= 2" in msg


@pytest.mark.parametrize("engine", ["onnx", "llamacpp"])
@pytest.mark.parametrize("key, value", [("tensor_parallel", 2), ("pipeline_parallel", 2),
                                        ("placement_strategy", "PACK")])
def test_parallel_keys_on_other_engines_are_refused(engine, key, value):
    msg = _err(engine=engine, **{key: value})
    assert f"models.0: {key} shards a model over several engine workers, which only engine vllm does" in msg
    assert f"engine '{engine}'" in msg and f"fix: remove {key}, or serve the model with engine: vllm" in msg


def test_gpus_that_contradict_the_workers_are_refused_naming_both():
    msg = _err(source="meta-llama/Llama-3.1-70B-Instruct", gpus=2, tensor_parallel=4)
    assert "gpus=2 GPUs per replica, but tensor_parallel x pipeline_parallel = 4 x 1 = 4 workers" in msg
    assert "fix: set gpus: 4" in msg


def test_a_gpu_share_cannot_hold_several_workers():
    msg = _err(gpus=0.5, tensor_parallel=2)
    assert "gpus=0.5 is a share of one GPU" in msg and "fix: set gpus: 2" in msg


def test_gpus_that_do_not_split_into_the_pipeline_stages_are_refused():
    msg = _err(source="meta-llama/Llama-3.1-70B-Instruct", gpus=3, pipeline_parallel=2)
    assert "gpus=3 cannot be split into pipeline_parallel=2 stages" in msg and "fix:" in msg


def test_cpu_workers_cannot_spread_over_nodes():
    msg = _err(tensor_parallel=2, placement_strategy="SPREAD")
    assert "placement_strategy SPREAD: on CPU (gpus: 0)" in msg and "mp executor" in msg
    assert "fix: placement_strategy: STRICT_PACK" in msg


def test_a_placement_strategy_for_a_single_worker_is_refused():
    assert "fix: remove placement_strategy" in _err(placement_strategy="PACK")


def test_placement_strategy_is_one_of_rays():
    msg = _err(tensor_parallel=2, placement_strategy="ANYWHERE")
    assert "models.0.placement_strategy" in msg and "STRICT_PACK" in msg


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend"])
def test_engine_args_cannot_set_the_parallel_layout(key):
    msg = _err(engine_args={key: 2})
    assert f"engine_args.{key} is set by homefire" in msg


def test_a_shape_that_cannot_be_read_skips_the_check_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="homefire.serve.config"):
        m = _model(source="someorg/not-on-this-machine", tensor_parallel=3)
    assert m.tp == 3
    assert "tensor_parallel 3 / pipeline_parallel 1 not checked against the model's shape" in caplog.text


# ------------------------------------------------------------------ the planner uses the config's tensor_parallel
def test_plan_shows_the_configured_tensor_parallel_row():
    from homefire.serve.plan import Workload, plan_app
    from homefire.serve.specs import load_gpus, pick_gpus

    cfg = validate_config(AppConfig, {"models": [{"name": "m", "source": "meta-llama/Llama-3.1-8B-Instruct",
                                                  "tensor_parallel": 4, "max_model_len": 8192}]})
    (plan,) = plan_app(cfg, pick_gpus(load_gpus(), ["h100"]), Workload())
    assert [(r.target, r.tp, r.role) for r in plan.rows] == [
        ("cpu", 4, "gpus: 0"), ("h100", 1, "smallest TP"), ("h100", 4, "tensor_parallel: 4")]
    cpu = plan.rows[0]
    assert cpu.kv_bytes_per_token_per_gpu == plan.kv_bytes_per_token // 4  # each CPU worker holds 2 of 8 KV heads


# ------------------------------------------------------------------ CPU workers' cores
def test_cpu_workers_get_contiguous_groups_of_the_replicas_cores(monkeypatch):
    from homefire.serve.engines import vllm

    monkeypatch.setattr(vllm.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert vllm.cpu_threads_bind(2) == "0,1|2,3"  # one core left over goes to no worker, as vLLM's own reserve
    assert vllm.cpu_threads_bind(4) == "0|1|2|3"
    monkeypatch.setattr(vllm.os, "sched_getaffinity", lambda pid: {3})
    with pytest.raises(EngineError) as e:
        vllm.cpu_threads_bind(2, "m")
    assert "2 CPU workers need a core each" in str(e.value) and "VLLM_CPU_OMP_THREADS_BIND" in str(e.value)


# ------------------------------------------------------------------ against the cluster's node types
ONE_GPU_NODES = {"head": {"CPU": 8}, "gpu-1x": {"CPU": 8, "GPU": 1}}


def _fits(types, **kw) -> None:
    from homefire.serve.builders import check_fits_node_types

    cfg = validate_config(AppConfig, {"models": [{"name": "big", "source": "demo-tiny", **kw}]}, "t.yaml")
    check_fits_node_types(cfg, types)


def test_a_replica_needing_more_gpus_on_one_node_than_any_node_type_has_is_refused_naming_the_types():
    _fits({**ONE_GPU_NODES, "gpu-2x": {"CPU": 16, "GPU": 2}}, gpus=2, tensor_parallel=2)
    with pytest.raises(ConfigError) as e:
        _fits(ONE_GPU_NODES, gpus=2, tensor_parallel=2)
    msg = str(e.value)
    assert msg.startswith("models.0.tensor_parallel:") and "needs 2 GPUs on one node" in msg
    assert "gpu-1x: 1" in msg and "pipeline_parallel" in msg and "PACK" in msg and "cluster/*.yaml" in msg


def test_across_nodes_each_worker_needs_one_gpu_and_unknown_node_types_rule_nothing_out():
    _fits(ONE_GPU_NODES, gpus=2, pipeline_parallel=2, placement_strategy="PACK")  # one GPU per bundle
    with pytest.raises(ConfigError) as e:
        _fits({"cpu-only": {"CPU": 16}}, gpus=0.5)
    assert str(e.value).startswith("models.0.gpus:") and "needs 1 GPUs" in str(e.value)
    _fits(None, gpus=2, tensor_parallel=2)  # a local Ray or a hand-started cluster: Serve reports it pending
    _fits({"cpu-only": {"CPU": 16}}, gpus=0)
