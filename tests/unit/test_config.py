"""Config models: every shipped YAML loads; bad configs are refused naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from homefire.config import load_config, validate_config
from homefire.errors import ConfigError
from homefire.serve.builders import app_config_from_file, load_app_config
from homefire.serve.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for d in ("serve", "train", "tune", "cluster") for p in (ROOT / d).rglob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.parent.name == "configs" and p.parent.parent.name == "serve" for p in SHIPPED)


@pytest.mark.parametrize("path", [p for p in SHIPPED if "/serve/" in str(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_serve_yaml_loads_and_says_how_to_run_it(path):
    text = path.read_text()
    assert text.startswith("#"), "a shipped YAML opens with a comment saying what it is"
    opening = text.split("\n\n")[0]
    if path.parent.name == "data":  # the capacity planner's tables: GPU specs and prices, well-known model shapes
        from homefire.serve import specs

        assert "homefire plan" in opening
        if path.name == "gpus.yaml":
            table = specs.load_gpus()
            assert table.gpus and table.prices_date in opening  # prices say when they were read
        else:
            assert all(specs.ModelShape.from_config(c, path.name).params() > 1e9
                       for c in specs.shipped_shapes().values())
        return
    assert "homefire serve" in opening or "serve run" in opening
    cfg = app_config_from_file(path)
    assert cfg.models


def test_embedded_default_serves_two_models_on_vllm():
    cfg = load_app_config(None)
    assert len(cfg.models) >= 2 and all(m.engine == "vllm" for m in cfg.models)
    assert cfg.server.host == "127.0.0.1"


def _err(data) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(AppConfig, data, "test.yaml")
    return str(e.value)


def test_unknown_key_is_named_with_a_suggestion():
    msg = _err({"models": [{"name": "a", "source": "demo", "gpu": 1}]})
    assert "models.0.gpu: unknown key" in msg and "did you mean 'gpus'" in msg


def test_bad_value_names_key_value_and_fix():
    msg = _err({"models": [{"name": "a", "source": "demo", "gpus": -1}]})
    assert "models.0.gpus" in msg and "-1" in msg and "Fix" in msg


def test_missing_models_is_named():
    assert "models: required key is missing" in _err({"server": {}})


def test_fractional_gpus_above_one_are_refused():
    assert "whole number" in _err({"models": [{"name": "a", "source": "demo", "gpus": 1.5}]})


def test_autoscaling_bounds_are_checked():
    msg = _err({"models": [{"name": "a", "source": "demo", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]})
    assert "min_replicas (3) is above max_replicas (2)" in msg


def test_replicas_and_autoscaling_are_exclusive():
    msg = _err({"models": [{"name": "a", "source": "d", "replicas": 2, "autoscaling": {"max_replicas": 3}}]})
    assert "not both" in msg


def test_duplicate_model_names_are_refused():
    assert "served twice" in _err({"models": [{"name": "a", "source": "d"}, {"name": "a", "source": "e"}]})


def test_trust_remote_code_is_off_by_default_and_not_smuggled_through_engine_args():
    cfg = validate_config(AppConfig, {"models": [{"name": "a", "source": "d"}]})
    assert cfg.models[0].trust_remote_code is False
    assert "trust_remote_code" in _err({"models": [{"name": "a", "source": "d", "engine_args": {"trust_remote_code": True}}]})


def test_half_gpu_sets_the_engine_memory_share():
    cfg = validate_config(AppConfig, {"models": [{"name": "a", "source": "d", "gpus": 0.5}, {"name": "b", "source": "d"}]})
    assert cfg.models[0].memory_share() == 0.45
    assert cfg.models[1].memory_share() == 0.3


def test_yaml_syntax_errors_give_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("models:\n  - name: a\n   source: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(AppConfig, p)
    assert "not valid YAML at line" in str(e.value)


def test_serve_config_with_two_homefire_apps_is_refused(tmp_path):
    p = tmp_path / "two.yaml"
    app = {"import_path": "homefire.serve:build_app", "args": {"models": [{"name": "a", "source": "d"}]}}
    p.write_text(yaml.safe_dump({"applications": [app, app]}))
    with pytest.raises(ConfigError, match="exactly one application"):
        app_config_from_file(p)


def test_engine_settings_are_typed_per_engine():
    cfg = validate_config(AppConfig, {"models": [
        {"name": "a", "source": "d"},
        {"name": "b", "source": "d", "engine": "onnx", "max_concurrency": 2},
        {"name": "c", "source": "d", "engine": "llamacpp", "slots": 2, "threads": 1},
    ]})
    assert [type(m).__name__ for m in cfg.models] == ["VLLMModelConfig", "OnnxModelConfig", "LlamaCppModelConfig"]
    assert cfg.models[1].max_concurrency == 2 and cfg.models[2].slots == 2


def test_a_vllm_setting_on_another_engine_names_the_key_and_the_allowed_ones():
    msg = _err({"models": [{"name": "a", "source": "d", "engine": "llamacpp", "max_loras": 2}]})
    assert "models.0.max_loras: unknown key" in msg and "slots" in msg and "llamacpp" not in msg.split("allowed")[0]


def test_unknown_engine_lists_the_engines():
    msg = _err({"models": [{"name": "a", "source": "d", "engine": "tgi"}]})
    assert "models.0" in msg and "vllm, onnx, llamacpp, mock" in msg


def test_engine_args_cannot_undo_homefire_settings():
    msg = _err({"models": [{"name": "a", "source": "d", "engine_args": {"max_model_len": 99}}]})
    assert "engine_args.max_model_len is set by homefire" in msg and "set `max_model_len` on the model" in msg


def test_gpu_providers_need_gpus():
    msg = _err({"models": [{"name": "a", "source": "d", "engine": "onnx", "provider": "tensorrt"}]})
    assert "provider 'tensorrt' runs on an NVIDIA GPU" in msg and "gpus: 1" in msg


def _app(models, **server):
    return validate_config(AppConfig, {"models": models, "server": server}, "t")


def test_one_model_on_one_replica_is_served_with_its_ingress_and_anything_else_separately():
    one = {"name": "a", "source": "demo"}
    assert _app([one]).ingress_with_model()
    assert not _app([one, {"name": "b", "source": "demo"}]).ingress_with_model()
    assert not _app([{**one, "replicas": 2}], proxy="serve").ingress_with_model()
    assert not _app([{**one, "autoscaling": {"min_replicas": 0, "max_replicas": 1}}]).ingress_with_model()
    assert not _app([one], ingress="separate").ingress_with_model()
    assert _app([{**one, "replicas": 3}], proxy="serve", ingress="with_model").ingress_with_model()


@pytest.mark.parametrize("models, server, expected", [
    ([{"name": "a", "source": "d"}, {"name": "b", "source": "d"}], {}, "2 models are configured"),
    ([{"name": "a", "source": "d", "replicas": 2}], {}, "fix: set server.proxy: serve"),
    ([{"name": "a", "source": "d", "autoscaling": {"min_replicas": 0, "max_replicas": 2}}], {"proxy": "serve"},
     "cannot scale model 'a' to zero"),
    ([{"name": "a", "source": "d", "replicas": 2, "routing": "prefix_affinity"}], {"proxy": "serve"},
     "asks for routing 'prefix_affinity', which needs the prompt"),
])
def test_ingress_with_model_that_cannot_work_names_the_key_and_the_fix(models, server, expected):
    with pytest.raises(ConfigError) as err:
        _app(models, ingress="with_model", **server)
    assert "server.ingress" in str(err.value) and expected in str(err.value)
