"""Pretrain the offline demo models on the English text that ships with Python, so they speak.

The same pipeline as ``homefire train`` (Ray Train workers, checkpoints, report), full-parameter,
on pydoc's topic help packed into fixed-length blocks. The result is a new version of the model
in the registry (``demo@2``, parent ``demo@1``), cached by a hash of the model recipe and this one.

    homefire models build-demo            # both demo models, a few minutes on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass

from homefire.models.build import DEMO_RECIPES, ModelRecipe, corpus_text, ensure_model
from homefire.registry import Entry, Registry

logger = logging.getLogger(__name__)

#: Bump when the pretraining code changes what it produces.
PRETRAIN_CODE_VERSION = 1


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines a pretrained demo model (with its model recipe)."""

    epochs: int = 3
    max_steps: int | None = None
    lr: float = 3e-3
    batch_size: int = 8
    max_length: int = 256
    workers: int = 2
    eval_fraction: float = 0.05
    seed: int = 0

    def hash(self, model_hash: str) -> str:
        payload = json.dumps({**dataclasses.asdict(self), "model": model_hash, "code": PRETRAIN_CODE_VERSION}, sort_keys=True)
        return "pretrain-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


DEMO_PRETRAIN: dict[str, PretrainRecipe] = {
    "demo": PretrainRecipe(epochs=8),
    "demo-tiny": PretrainRecipe(epochs=4, lr=5e-3, max_length=128, batch_size=16),
}


def corpus_rows() -> list:
    """pydoc's topics as text rows, one per topic."""
    from pydoc_data import topics

    from homefire.train.data import Row

    return [Row(f"pydoc_data.topics[{k!r}]", {"text": v}) for k, v in sorted(topics.topics.items())]


def ensure_pretrained(name: str, registry: Registry | None = None, recipe: PretrainRecipe | None = None,
                      address: str | None = None, model: ModelRecipe | None = None, verbose: bool = False) -> Entry:
    """The pretrained version of demo model ``name`` (or of ``model``, another offline shape such as a benchmark's):
    from the registry, or trained now and registered."""
    from homefire.train.config import TrainConfig
    from homefire.train.data import prepare_data
    from homefire.train.trainer import run_training

    registry = registry or Registry()
    recipe = recipe or DEMO_PRETRAIN[name]
    base = ensure_model(model or DEMO_RECIPES[name], registry)
    key = recipe.hash(base.recipe_hash or "")
    found = registry.find_by_recipe(name, key)
    if found is not None:
        return found
    cfg = TrainConfig.model_validate({
        "model": {"source": base.path}, "method": "full",
        "data": {"train": "pydoc_data/topics.py", "format": "text", "max_length": recipe.max_length,
                 "eval_fraction": recipe.eval_fraction, "seed": recipe.seed},
        "optim": {"lr": recipe.lr, "epochs": recipe.epochs, "max_steps": recipe.max_steps, "batch_size": recipe.batch_size,
                  "warmup_steps": 20, "weight_decay": 0.01, "seed": recipe.seed},
        "scaling": {"workers": recipe.workers},
        "checkpoint": {"every_n_steps": 100},
        "output": {"name": name, "to_registry": False},
        "log_every_n_steps": 20,
    })
    from transformers import AutoTokenizer

    rows = corpus_rows()
    prepared = prepare_data(cfg.data, AutoTokenizer.from_pretrained(base.path), rows=rows)
    prepared.data_hash = hashlib.sha256(corpus_text().encode()).hexdigest()
    print(f"pretraining {name} on pydoc's English text ({prepared.stats['train_examples']} blocks of "
          f"{recipe.max_length} tokens, {recipe.epochs} epoch(s), {recipe.workers} workers) ...", flush=True)
    report = run_training(cfg, address=address, registry=registry, prepared=prepared, verbose=verbose)
    if report.artifact is None:
        raise RuntimeError(f"pretraining {name} failed; see {report.run_dir}")
    entry = registry.register(
        name, report.artifact, kind="base", parent=base.ref, recipe_hash=key, run=report.run_id,
        metrics={"eval_before": report.eval_before, "eval_after": report.eval_after, "final_loss": report.final_loss,
                 "steps": report.steps, "tokens_per_s": report.tokens_per_s},
        config={"pretrain": dataclasses.asdict(recipe), "lineage": {"base": base.ref, "data": "pydoc_data.topics",
                                                                     "data_hash": prepared.data_hash, "run_id": report.run_id}},
    )
    print(report.summary(), flush=True)
    return entry


__all__ = ["DEMO_PRETRAIN", "PretrainRecipe", "corpus_rows", "ensure_pretrained"]
