"""The sweep config: one typed model, unknown keys rejected, impossible combinations refused when it loads.

Example (``tune/configs/demo-quantize.yaml``)::

    model: {source: demo}
    space: {quantize: [onnx-int8, onnx-int4, gguf-q8_0, gguf-q4_0, vllm-w8a8]}
    select: {max_ppl_increase: 0.02, concurrency: 1}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from homefire import constants
from homefire.config import ModelSpec, StrictModel, apply_overrides, load_yaml, validate_config
from homefire.errors import ConfigError

#: The shipped held-out text perplexity is measured on (not in the demo models' training corpus).
HELDOUT_TEXT = Path(__file__).parent / "data" / "heldout.txt"


class SpaceSpec(StrictModel):
    """What the sweep tries: one trial per value (grid search)."""

    quantize: list[str] = Field(
        min_length=1,
        description="Formats to make and measure (`homefire models convert --to` values): onnx-int4, onnx-int8, "
        "onnx-fp32, gguf-q8_0, gguf-q4_0, gguf-f16, gguf-f32, vllm-w8a8, vllm-w4a16.",
    )

    @field_validator("quantize")
    @classmethod
    def _known_formats(cls, values: list[str]) -> list[str]:
        from homefire.convert import TARGETS

        unknown = [v for v in values if v not in TARGETS]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(unknown)}; fix: use any of {', '.join(TARGETS)}")
        if len(set(values)) != len(values):
            raise ValueError("a format is listed twice; fix: list each once")
        return values


class EvalSpec(StrictModel):
    """Quality: perplexity on held-out text, scored by the engine that serves the variant."""

    text: str | None = Field(None, description="A UTF-8 text file; default: the held-out text shipped with homefire.")
    max_tokens: int = Field(1024, ge=32, le=1_000_000, description="Tokens of the text scored (in context windows).")
    window: int = Field(256, ge=16, le=131_072, description="Tokens per scored window (at most the context length).")


class SpeedSpec(StrictModel):
    """Speed: greedy decode of `prompts` requests of `input_len` tokens in / `output_len` out, on the engine itself."""

    concurrency: list[int] = Field([1, 8], min_length=1, description="Streams at once; one measurement each.")
    prompts: int = Field(8, ge=1, le=10_000, description="Requests per measurement (at least the concurrency).")
    input_len: int = Field(64, ge=1, le=131_072, description="Prompt tokens per request.")
    output_len: int = Field(32, ge=1, le=131_072, description="Generated tokens per request (end-of-text ignored).")


class SelectSpec(StrictModel):
    """Which variant wins: the fastest at `concurrency` among those within every bound."""

    max_ppl_increase: float = Field(0.02, ge=0, description="Largest relative perplexity increase over the original.")
    min_speedup: float | None = Field(None, gt=0, description="Smallest decode speedup over the original on transformers.")
    max_size_mb: float | None = Field(None, gt=0, description="Largest size on disk.")
    concurrency: int = Field(1, ge=1, description="The workload the winner is chosen for (one of speed.concurrency).")


class TuneConfig(StrictModel):
    """A `homefire tune` sweep."""

    name: str = Field("tune", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Experiment name.")
    model: ModelSpec = Field(description="The model to optimize (an hf registry entry, demo name or directory).")
    space: SpaceSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    select: SelectSpec = Field(default_factory=SelectSpec)
    cpus_per_trial: float = Field(1.0, gt=0, le=1024, description="Logical CPUs each trial reserves.")
    max_concurrent_trials: int = Field(1, ge=1, le=1024, description="Trials at once (one on a 2-core box).")
    storage_path: str | None = Field(None, description="Where trial results go; default $HOMEFIRE_HOME/tune.")
    search: Literal["grid"] = Field("grid", description="Search algorithm: one trial per value of the space.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "TuneConfig":
        if self.select.concurrency not in self.speed.concurrency:
            raise ValueError(
                f"select.concurrency {self.select.concurrency} is not measured; fix: add it to speed.concurrency "
                f"{self.speed.concurrency}"
            )
        if self.eval.text is not None and not Path(self.eval.text).expanduser().is_file():
            raise ValueError(f"eval.text {self.eval.text} is not a file; fix: point it at a UTF-8 text file")
        return self

    @property
    def run_root(self) -> str:
        return self.storage_path or str(constants.HOME_DIR / "tune")

    def eval_text(self) -> str:
        return Path(self.eval.text).expanduser().read_text() if self.eval.text else HELDOUT_TEXT.read_text()


def machine_refusals(cfg: TuneConfig) -> list[str]:
    """Formats in the space this machine cannot make or run, with why (checked when the config loads)."""
    from homefire.convert import compressed

    out = []
    if "vllm-w4a16" in cfg.space.quantize and "avx512f" not in compressed.cpu_flags() and not compressed._has_cuda():
        out.append("space.quantize: vllm-w4a16 needs AVX-512 (avx512f) or a CUDA GPU, which this machine lacks; "
                   "fix: remove it, or use vllm-w8a8 / gguf-q4_0")
    return out


def load_tune_config(path: str | Path, overrides: dict | None = None) -> TuneConfig:
    """Load and validate a sweep config (``overrides``: dotted keys, as ``--set``); ConfigError naming the key, and
    naming what this machine cannot run."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: expected a mapping at the top level")
    cfg = validate_config(TuneConfig, apply_overrides(data, overrides), str(path))
    refusals = machine_refusals(cfg)
    if refusals:
        raise ConfigError(f"invalid config {path}:\n  " + "\n  ".join(refusals))
    return cfg
