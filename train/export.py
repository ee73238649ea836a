"""Hand-off: a finished run's adapter (or merged / full model) becomes a registry entry with its lineage.

The entry records the base model and its hash, the data hash, the config, the metrics and the
run id, so ``homefire models list`` can say where every adapter came from, and a serve
replica can check that an adapter fits the model it serves.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from homefire.registry import Registry
from homefire.train.config import TrainConfig


def merge_adapter(model_path: str, adapter_dir: str, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Write the base with the LoRA weights folded in (safetensors), with the base's tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, out_dir / "generation_config.json")
    return out_dir


def register_result(cfg: TrainConfig, registry: Registry, artifact: Path, report, *, base_ref: str, base_hash: str,
                    model_path: str, recipe_hash: str | None = None) -> str:
    """Register the run's result; returns the reference to serve it by (``base:adapter`` or ``name@N``)."""
    lineage = {
        "base": base_ref, "base_hash": base_hash, "data_hash": report.data.get("data_hash"), "run_id": report.run_id,
        "run_dir": report.run_dir, "method": cfg.method, "workers": cfg.scaling.workers,
    }
    if cfg.distill is not None:
        lineage["teacher"] = cfg.distill.teacher
    metrics = {
        "final_loss": report.final_loss, "eval_before": report.eval_before, "eval_after": report.eval_after,
        "exact_match": {k: v for k, v in report.exact_match.items() if k != "samples"}, "steps": report.steps,
    }
    config = {"lineage": lineage, "train_config": cfg.model_dump(mode="json")}
    base_name = base_ref.split("@")[0]
    if cfg.method == "lora" and not cfg.output.merge:
        entry = registry.register(cfg.output.name, artifact, kind="adapter", parent=base_ref, metrics=metrics,
                                  config=config, run=report.run_id, recipe_hash=recipe_hash)
        return f"{base_name}:{entry.name}"
    if cfg.method == "lora":
        with tempfile.TemporaryDirectory(prefix="homefire-merge-") as tmp:
            merged = merge_adapter(model_path, str(artifact), Path(tmp) / "merged", cfg.model.trust_remote_code)
            entry = registry.register(cfg.output.name, merged, kind="base", parent=base_ref, metrics=metrics,
                                      config={**config, "merged": True}, run=report.run_id, recipe_hash=recipe_hash)
    else:
        entry = registry.register(cfg.output.name, artifact, kind="base", parent=base_ref, metrics=metrics,
                                  config=config, run=report.run_id, recipe_hash=recipe_hash)
    return entry.ref


__all__ = ["merge_adapter", "register_result"]
