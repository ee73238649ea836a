"""GPU-only training paths (skipped without CUDA): QLoRA (4-bit base via bitsandbytes) and LoRA under NCCL."""

from __future__ import annotations

from pathlib import Path

import pytest

from homefire.config import validate_config
from homefire.train import TrainConfig, run_training

pytestmark = pytest.mark.gpu
DATA = Path(__file__).resolve().parents[2] / "train" / "data" / "homefire-answer.jsonl"


@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_lora_and_qlora_train_on_one_gpu(tmp_path, tiny_model_path, quantize):
    cfg = validate_config(TrainConfig, {
        "model": {"source": "demo-tiny"}, "lora": {"quantize": quantize},
        "data": {"train": str(DATA), "max_length": 64},
        "optim": {"lr": 1e-2, "batch_size": 8, "max_steps": 20}, "scaling": {"workers": 1, "use_gpu": True},
        "output": {"name": f"gpu-{quantize}"}, "storage_path": str(tmp_path),
    }, "gpu test")
    report = run_training(cfg)
    assert report.status == "finished" and report.eval_after["eval_loss"] < report.eval_before["eval_loss"]
