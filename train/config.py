"""The training config: one typed model, unknown keys rejected, every field documented.

Example (``train/configs/demo-lora.yaml``)::

    model: {source: demo-tiny}
    data: {train: train/data/reverse.jsonl}
    lora: {r: 8, alpha: 16}
    scaling: {workers: 2}
    output: {name: reverse}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from homefire import constants
from homefire.config import ModelSpec, StrictModel, load_config, validate_config
from homefire.errors import ConfigError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSpec(StrictModel):
    """The LoRA adapter: rank, scale, dropout and the layers it wraps (PEFT ``LoraConfig``)."""

    r: int = Field(8, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_LINEAR), min_length=1,
        description="Module names to wrap; the default is every attention and MLP projection of a Llama-shaped model.",
    )
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base in 4 or 8 bits (needs CUDA and bitsandbytes)."
    )


class DataSpec(StrictModel):
    """Where the examples are and how they become tokens."""

    train: str = Field(description="A JSONL/JSON/CSV/Parquet/text file (or a directory of them) with the training rows, "
                       "or builtin:pydoc-topics (English prose that ships with Python: no download).")
    eval: str | None = Field(None, description="Held-out rows; default: `eval_fraction` of `train`.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of `train` held out when `eval` is not given.")
    format: Literal["auto", "chat", "instruction", "text"] = Field(
        "auto",
        description="`chat` rows have `messages`; `instruction` rows have `instruction`/`input`/`output` or "
        "`prompt`/`completion`; `text` rows have `text` (loss on every token, packed); `auto` looks at each row.",
    )
    max_length: int = Field(512, ge=8, le=1_048_576, description="Tokens per example; longer ones are truncated and counted.")
    seed: int = Field(0, description="Seed of the train/eval split and the shuffles.")


class OptimSpec(StrictModel):
    """Optimizer, schedule and loop length."""

    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    batch_size: int = Field(8, ge=1, description="Examples per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides `epochs`).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed of model init (adapter weights) and dropout.")


class ScalingSpec(StrictModel):
    """Ray Train's ``ScalingConfig``: how many workers and what each holds."""

    workers: int = Field(1, ge=1, le=4096, description="Data-parallel training workers.")
    use_gpu: bool = Field(False, description="One GPU per worker (CUDA + NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources per worker, e.g. {accelerator_type:A100: 0.001}."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers across nodes."
    )


class DeepSpeedSpec(StrictModel):
    """DeepSpeed ZeRO (instead of DDP)."""

    stage: Literal[2, 3] = Field(2, description="ZeRO stage: 2 shards optimizer state and gradients, 3 also parameters.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (DeepSpeed CPU Adam).")
    offload_params: bool = Field(False, description="ZeRO-3 only: keep parameters in CPU memory.")

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self):
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3. Fix: set deepspeed.stage: 3 or drop offload_params")
        return self


class CheckpointSpec(StrictModel):
    """When checkpoints are written and how many are kept."""

    every_n_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept in the run's storage.")


class ExactMatchSpec(StrictModel):
    """A task metric: greedy answers to held-out prompts compared with their references."""

    samples: int = Field(32, ge=1, le=10_000, description="Held-out examples scored.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Generation budget per answer.")


class EvalSpec(StrictModel):
    """Evaluation on the held-out split, before and after training."""

    every_n_steps: int | None = Field(None, ge=1, description="Also evaluate every N steps (loss only).")
    max_batches: int | None = Field(None, ge=1, description="Cap on eval batches per worker (default: the whole split).")
    exact_match: ExactMatchSpec | None = Field(
        None, description="Score greedy answers against the references (chat/instruction data)."
    )


class DistillSpec(StrictModel):
    """Knowledge distillation: the student (``model``) learns the teacher's next-token distribution.

    loss = (1 - alpha) * cross-entropy on the data + alpha * T^2 * KL(teacher_T || student_T), forward KL at
    temperature T over every target token; the teacher is frozen and must share the student's vocabulary.
    """

    teacher: str = Field(description="The teacher model: a registry entry, demo name or model directory.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term (0: plain fine-tuning, 1: logits only).")
    temperature: float = Field(1.0, gt=0, le=20, description="Softmax temperature of both distributions in the KL.")


class OutputSpec(StrictModel):
    """What the run hands to the registry."""

    name: str = Field(description="Registry name of the adapter (served as `<base>:<name>`) or the merged model.",
                      pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    merge: bool = Field(False, description="Register the base with the adapter merged in (a full model) instead.")
    to_registry: bool = Field(True, description="Add the result to the registry.")


class TrainConfig(StrictModel):
    """A fine-tuning run. See ``train/configs/*.yaml``."""

    model: ModelSpec = Field(description="The base model (registry entry, directory or hub id).")
    method: Literal["lora", "full", "distill"] = Field(
        "lora", description="Train a LoRA adapter, every parameter, or every parameter from a teacher (distill).")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape (method: lora).")
    distill: DistillSpec | None = Field(None, description="Teacher and loss mix (method: distill).")
    data: DataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    deepspeed: DeepSpeedSpec | None = Field(None, description="Use DeepSpeed ZeRO instead of DDP.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output: OutputSpec
    storage_path: str | None = Field(
        None, description="Where runs and checkpoints go: a local dir or a shared URI (s3://, gs://, NFS path). "
        "Default: $HOMEFIRE_HOME/runs."
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint before the run fails.")
    log_every_n_steps: int = Field(1, ge=1, description="Print a step line every N steps.")

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.method == "full" and self.lora.quantize != "none":
            raise ValueError("lora.quantize needs method: lora. Fix: drop lora.quantize or set method: lora")
        if self.lora.quantize != "none" and self.deepspeed is not None:
            raise ValueError("lora.quantize (QLoRA) runs under DDP here, not DeepSpeed. Fix: drop deepspeed or set lora.quantize: none")
        if self.method != "lora" and self.output.merge:
            raise ValueError(f"output.merge applies to method: lora (a {self.method} run already is a model). Fix: drop it")
        if (self.method == "distill") != (self.distill is not None):
            raise ValueError("method: distill and a distill section go together. Fix: set both (distill: {teacher: "
                             "<model>}) or neither")
        if self.method == "distill" and self.lora.quantize != "none":
            raise ValueError("lora.quantize does not apply to method: distill (every parameter trains). Fix: drop it")
        return self

    def run_root(self) -> str:
        return self.storage_path or str(constants.RUNS_DIR)


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Load a training YAML; relative data paths are taken relative to the YAML's folder when they exist there."""
    from homefire.config import apply_overrides, load_yaml

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: expected a mapping at the top level")
    base = Path(path).resolve().parent
    for key in ("train", "eval"):
        value = (data.get("data") or {}).get(key) if isinstance(data.get("data"), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            data["data"][key] = str((base / value).resolve())
    return validate_config(TrainConfig, apply_overrides(data, overrides), str(path))


__all__ = ["ALL_LINEAR", "TrainConfig", "load_config", "load_train_config"]
