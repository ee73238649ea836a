"""`homefire tune` configs: the shipped ones load; bad keys, formats and impossible combinations are refused when
the config loads, naming the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from homefire.convert import compressed
from homefire.errors import ConfigError
from homefire.tune.config import HELDOUT_TEXT, check_space, load_tune_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "tune" / "configs").glob("*.yaml"))


def _write(tmp_path, data) -> Path:
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base(**kw):
    return {"model": {"source": "demo"}, "space": {"quantize": ["gguf-q8_0"]}, **kw}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_tune_configs_load_and_say_how_to_run_them(path, monkeypatch):
    monkeypatch.setattr(compressed, "cpu_flags", lambda: {"avx512f"})
    monkeypatch.setattr(compressed, "_has_cuda", lambda: "gpu" in path.name)  # the GPU sweep validates as on its node
    assert path.read_text().startswith("#") and "homefire tune" in path.read_text().split("\n\n")[0]
    cfg = load_tune_config(path)
    assert cfg.space.quantize and cfg.select.concurrency in cfg.speed.concurrency


def test_the_heldout_text_ships():
    assert len(HELDOUT_TEXT.read_text().split()) > 300


@pytest.mark.parametrize("data, expected", [
    (_base(space={"quantize": ["gguf-q9"]}), "space.quantize: unknown format(s) gguf-q9; fix: use any of"),
    (_base(space={"quantize": []}), "space.quantize"),
    (_base(space={"prune": ["wanda-101"]}), "space.prune"),
    (_base(space={"prune": ["foo-50"]}), "<magnitude|wanda|mlp|heads|layers>-<percent removed"),
    (_base(space={"prune": ["mlp-2of4"]}), "2of4 is a sparsity pattern for magnitude or wanda"),
    (_base(space={"prune": ["mlp-25", "prune-mlp-25"]}), "listed twice"),
    (_base(space={"prune": ["mlp-25"], "prune_then_quantize": True}), "prune_then_quantize needs both"),
    (_base(space={"quantize": ["onnx-int4", "onnx-int4"]}), "listed twice"),
    (_base(selct={"max_ppl_increase": 0.1}), "selct: unknown key"),
    (_base(select={"concurrency": 4}), "select.concurrency 4 is not measured; fix: add it to speed.concurrency"),
    (_base(select={"max_ppl_increase": -1}), "select.max_ppl_increase"),
    (_base(eval={"text": "/no/such/file.txt"}), "eval.text /no/such/file.txt is not a file"),
    (_base(eval={"task": "/no/such/task.jsonl"}), "eval.task: task /no/such/task.jsonl"),
    ({"space": {"quantize": ["gguf-q8_0"]}}, "model"),
])
def test_bad_configs_name_the_key(tmp_path, data, expected):
    with pytest.raises(ConfigError) as e:
        load_tune_config(_write(tmp_path, data))
    assert expected in str(e.value)


def test_w4a16_without_avx512_is_refused_when_the_config_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(compressed, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(compressed, "_has_cuda", lambda: False)
    with pytest.raises(ConfigError) as e:
        load_tune_config(_write(tmp_path, _base(space={"quantize": ["gguf-q8_0", "vllm-w4a16"]})))
    assert "space.quantize: vllm-w4a16 needs AVX-512 (avx512f)" in str(e.value) and "fix:" in str(e.value)


def test_gpu_only_variants_are_refused_on_a_cpu_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(compressed, "_has_cuda", lambda: False)
    with pytest.raises(ConfigError) as e:
        load_tune_config(_write(tmp_path, _base(space={"quantize": ["vllm-fp8"]}, gpus_per_trial=1)))
    assert "space.quantize: vllm-fp8 runs on CUDA GPUs only" in str(e.value)
    assert "gpus_per_trial: 1.0 but this machine has no CUDA GPU" in str(e.value)


def test_the_gpu_sweep_is_an_8b_class_run_on_gpus(monkeypatch):
    monkeypatch.setattr(compressed, "_has_cuda", lambda: True)
    cfg = load_tune_config(ROOT / "tune" / "configs" / "llama-8b-gpu.yaml")
    assert cfg.gpus_per_trial >= 1 and cfg.space.distill.use_gpu and "vllm-fp8" in cfg.space.quantize
    assert "prune-layers-25+distill+vllm-fp8" in cfg.space.variants() and cfg.select.concurrency == 32


def test_overrides_use_dotted_keys(tmp_path):
    cfg = load_tune_config(_write(tmp_path, _base()), {"select.max_ppl_increase": 0.05, "speed.concurrency": [1, 4]})
    assert cfg.select.max_ppl_increase == 0.05 and cfg.speed.concurrency == [1, 4]


def test_the_space_names_every_variant_in_order(tmp_path):
    cfg = load_tune_config(_write(tmp_path, _base(space={"quantize": ["gguf-q8_0", "onnx-int4"],
                                                         "prune": ["wanda-2of4", "prune-mlp-25"],
                                                         "prune_then_quantize": True})))
    assert cfg.space.variants() == [
        "gguf-q8_0", "onnx-int4", "prune-wanda-2of4", "prune-mlp-25", "prune-wanda-2of4+gguf-q8_0",
        "prune-wanda-2of4+onnx-int4", "prune-mlp-25+gguf-q8_0", "prune-mlp-25+onnx-int4",
    ]


def _model_dir(tmp_path, **shape) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, **shape}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_variants_the_model_cannot_become_are_refused_before_the_sweep(tmp_path):
    """The model's shapes are checked once its directory is known (before Ray starts), every problem at once."""
    cfg = load_tune_config(_write(tmp_path, _base(space={"prune": ["wanda-2of4", "heads-25", "mlp-25"]})))
    src = _model_dir(tmp_path, hidden_size=66, num_key_value_heads=2)
    with pytest.raises(ConfigError) as e:
        check_space(cfg, src)
    msg = str(e.value)
    assert "space.prune: prune-wanda-2of4:" in msg and "hidden_size 66" in msg
    assert "space.prune: prune-heads-25:" in msg and "prune-mlp-25" not in msg.split("prune-heads-25", 1)[1]


def test_a_fitting_space_passes_the_model_check(tmp_path):
    cfg = load_tune_config(_write(tmp_path, _base(space={"prune": ["wanda-2of4", "heads-50", "layers-50"]})))
    check_space(cfg, _model_dir(tmp_path))


def test_optuna_points_name_variants(tmp_path):
    cfg = load_tune_config(_write(tmp_path, _base(search="optuna", num_samples=4, space={
        "quantize": ["gguf-q4_0"], "prune_range": {"method": "layers", "max": 50, "step": 25}, "distill": {"steps": 5}})))
    assert cfg.space.optuna_space() == {"quantize": ["gguf-q4_0", "none"], "prune_pct": (0, 50, 25)}
    assert cfg.space.variant_of({"quantize": "none", "prune_pct": 0}) == "original"
    assert cfg.space.variant_of({"quantize": "gguf-q4_0", "prune_pct": 0}) == "gguf-q4_0"
    assert cfg.space.variant_of({"quantize": "gguf-q4_0", "prune_pct": 25}) == "prune-layers-25+distill+gguf-q4_0"
    listed = load_tune_config(_write(tmp_path, _base(search="optuna", space={"quantize": ["gguf-q8_0"],
                                                                              "prune": ["wanda-2of4"]})))
    assert listed.space.optuna_space() == {"quantize": ["gguf-q8_0", "none"], "prune": ["prune-wanda-2of4", "none"]}
    assert listed.space.variant_of({"quantize": "none", "prune": "prune-wanda-2of4"}) == "prune-wanda-2of4"


@pytest.mark.parametrize("data, expected", [
    (_base(space={"quantize": ["gguf-q8_0"], "prune_range": {"method": "mlp"}}), "prune_range is for search: optuna"),
    (_base(search="optuna", space={"quantize": ["gguf-q8_0"], "chains": ["prune-mlp-25+gguf-q8_0"]}),
     "search: optuna combines"),
    (_base(search="optuna", space={"prune_range": {"method": "rows"}}), "space.prune_range.method"),
    (_base(search="bayes"), "search"),
    (_base(scheduler="hyperband"), "scheduler"),
    (_base(scheduler="asha", reduction_factor=1), "reduction_factor"),
])
def test_search_settings_name_the_key(tmp_path, data, expected):
    with pytest.raises(ConfigError) as e:
        load_tune_config(_write(tmp_path, data))
    assert expected in str(e.value)


def test_kv_fp8_is_a_last_step_of_vllm_variants(tmp_path):
    cfg = load_tune_config(_write(tmp_path, _base(space={"chains": ["kv-fp8", "vllm-w8a8+kv-fp8"]})))
    assert cfg.space.variants() == ["kv-fp8", "vllm-w8a8+kv-fp8"]
    for bad in ("gguf-q4_0+kv-fp8", "kv-fp8+vllm-w8a8"):
        with pytest.raises(ConfigError, match="kv-fp8 .vLLM's fp8 KV cache. is the last step"):
            load_tune_config(_write(tmp_path, _base(space={"chains": [bad]})))
    # vLLM's CPU fp8 KV cache needs head sizes divisible by 32
    with pytest.raises(ConfigError, match="head size divisible by 32; this model's is 16"):
        check_space(cfg, _model_dir(tmp_path, hidden_size=64, num_attention_heads=4))
