"""The training config: shipped YAMLs load, bad keys are named with the fix, GPU-only features say so on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from homefire.cli import _parse_overrides
from homefire.config import validate_config
from homefire.errors import ConfigError
from homefire.train.config import TrainConfig, load_train_config
from homefire.train.recipe import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
TRAIN_YAMLS = sorted((ROOT / "train" / "configs").glob("*.yaml"))
BASE = {"model": {"source": "demo-tiny"}, "data": {"train": "x.jsonl"}, "output": {"name": "a"}}


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: p.name)
def test_every_shipped_train_yaml_loads_and_says_how_to_run_it(path):
    text = path.read_text()
    assert text.startswith("#") and ("homefire train" in text.split("\n\n")[0]
                                     or "homefire distill" in text.split("\n\n")[0])
    cfg = load_train_config(path)
    assert cfg.output.name and cfg.scaling.workers >= 1


def test_the_gpu_config_is_a_realistic_7b_class_run():
    cfg = load_train_config(ROOT / "train" / "configs" / "llama-8b-lora-gpu.yaml")
    assert cfg.scaling.use_gpu and cfg.scaling.workers >= 2 and cfg.deepspeed is not None
    assert "/" in cfg.model.source and cfg.model.dtype == "bfloat16" and cfg.data.max_length >= 2048


def test_demo_data_path_is_resolved_next_to_the_yaml():
    cfg = load_train_config(ROOT / "train" / "configs" / "demo-lora.yaml")
    assert Path(cfg.data.train).is_file()


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"optim.epoch: unknown key.*did you mean 'epochs'"):
        validate_config(TrainConfig, {**BASE, "optim": {"epoch": 1}})


@pytest.mark.parametrize("extra, words", [
    ({"deepspeed": {"stage": 2, "offload_params": True}}, "offload_params needs stage: 3"),
    ({"deepspeed": {"stage": 1}}, "deepspeed.stage"),
    ({"lora": {"quantize": "4bit"}, "deepspeed": {"stage": 2}}, "QLoRA"),
    ({"method": "full", "output": {"name": "a", "merge": True}}, "output.merge applies to method: lora"),
    ({"output": {"name": "bad name!"}}, "output.name"),
    ({"scaling": {"workers": 0}}, "scaling.workers"),
    ({"method": "distill"}, "method: distill and a distill section go together"),
    ({"distill": {"teacher": "demo"}}, "method: distill and a distill section go together"),
    ({"method": "distill", "distill": {"teacher": "demo", "alpha": 1.5}}, "distill.alpha"),
    ({"method": "distill", "distill": {"teacher": "demo"}, "lora": {"quantize": "4bit"}}, "lora.quantize does not apply"),
])
def test_cross_field_errors_name_the_key_and_fix(extra, words):
    with pytest.raises(ConfigError) as err:
        validate_config(TrainConfig, {**BASE, **extra})
    assert words in str(err.value)


def test_qlora_on_a_cpu_box_is_a_clear_error_before_anything_starts():
    from homefire.train.trainer import _check_qlora

    cfg = validate_config(TrainConfig, {**BASE, "lora": {"quantize": "4bit"}})
    with pytest.raises(ConfigError, match="QLoRA.*needs CUDA GPUs and bitsandbytes"):
        _check_qlora(cfg)


def test_set_overrides_use_yaml_values():
    assert _parse_overrides(["optim.lr=1e-4", "scaling.workers=4", "deepspeed={stage: 3}"]) == {
        "optim.lr": 1e-4, "scaling.workers": 4, "deepspeed": {"stage": 3}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _parse_overrides(["optim.lr"])
    cfg = load_train_config(ROOT / "train" / "configs" / "demo-lora.yaml", {"optim.lr": 1e-4, "scaling.workers": 1})
    assert cfg.optim.lr == 1e-4 and cfg.scaling.workers == 1


def test_deepspeed_config_follows_the_train_config():
    cfg = validate_config(TrainConfig, {**BASE, "deepspeed": {"stage": 3, "offload_optimizer": True, "offload_params": True},
                                        "optim": {"batch_size": 4, "grad_accum": 2}})
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert "bf16" not in ds  # fp32 on CPU


def test_distill_kl_is_the_forward_kl_over_target_tokens():
    import torch
    import torch.nn.functional as F

    from homefire.train.data import IGNORE_INDEX
    from homefire.train.recipe import distill_kl

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [4, 5, 6, 7, 8]])
    # positions scored: shifted by one like the LM loss, and only where the next label is a target
    rows = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    for t in (1.0, 2.0):
        want = sum(float((F.softmax(teacher[b, i] / t, -1) * (F.log_softmax(teacher[b, i] / t, -1)
                                                               - F.log_softmax(student[b, i] / t, -1))).sum())
                   for b, i in rows) / len(rows) * t * t
        assert float(distill_kl(student, teacher, labels, t)) == pytest.approx(want, rel=1e-5)
    assert float(distill_kl(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-6)
    # the gradient reaches the student only
    s = student.clone().requires_grad_(True)
    distill_kl(s, teacher, labels).backward()
    assert s.grad.abs().sum() > 0 and s.grad[0, 3:].abs().sum() == 0


def test_the_shipped_distill_config_distills_a_pruned_demo():
    cfg = load_train_config(ROOT / "train" / "configs" / "demo-distill.yaml")
    assert cfg.method == "distill" and cfg.distill.teacher == "demo" and cfg.model.source.startswith("demo-prune-")
    assert cfg.data.train == "builtin:pydoc-topics"


def test_builtin_text_needs_no_file():
    from homefire.train.data import BUILTIN_PYDOC, read_rows

    rows = read_rows(BUILTIN_PYDOC)
    assert len(rows) > 50 and all(r.data["text"] for r in rows)


def _tiny_llama(path, vocab_size: int):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from homefire.models.build import build_tokenizer

    path.mkdir()
    build_tokenizer(vocab_size, path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(path)
    return path


def test_a_teacher_with_another_vocabulary_is_refused_before_ray_starts(tmp_path):
    """The KL compares distributions over the same token ids: a teacher with another tokenizer is a config error
    naming distill.teacher, found before any worker (or Ray) starts."""
    import ray

    from homefire.registry import Registry
    from homefire.train.trainer import run_training

    student, teacher = _tiny_llama(tmp_path / "student", 300), _tiny_llama(tmp_path / "teacher", 400)
    data = tmp_path / "d.txt"
    data.write_text("Some text to learn from.\n\nAnother paragraph of it.\n")
    cfg = validate_config(TrainConfig, {
        "model": {"source": str(student)}, "method": "distill", "distill": {"teacher": str(teacher)},
        "data": {"train": str(data)}, "output": {"name": "s", "to_registry": False},
        "storage_path": str(tmp_path / "runs"),
    })
    with pytest.raises(ConfigError) as err:
        run_training(cfg, registry=Registry(tmp_path / "reg"))
    assert f"distill.teacher {teacher}" in str(err.value) and "is not the student's" in str(err.value)
    assert not ray.is_initialized()
