"""The sweep config: one typed model, unknown keys rejected, impossible combinations refused when it loads.

Example (``tune/configs/demo-quantize.yaml``)::

    model: {source: demo}
    space: {quantize: [onnx-int8, onnx-int4, gguf-q8_0, gguf-q4_0, vllm-w8a8], prune: [wanda-50, mlp-25]}
    select: {max_ppl_increase: 0.02, concurrency: 1}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from homefire import constants
from homefire.config import ModelSpec, StrictModel, apply_overrides, load_yaml, validate_config
from homefire.errors import ConfigError

#: The shipped held-out text perplexity is measured on (not in the demo models' training corpus).
HELDOUT_TEXT = Path(__file__).parent / "data" / "heldout.txt"


def _once(values: list[str], what: str) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} is listed twice; fix: list each once")
    return values


def _structured(prune_target: str) -> bool:
    from homefire.convert import prune

    return prune.parse(prune_target).structured


class DistillStep(StrictModel):
    """Distillation as a step of a trial: the pruned student learns the original's logits on Ray Train."""

    steps: int = Field(60, ge=1, le=1_000_000, description="Optimizer steps.")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = (1 - alpha) * CE + alpha * T^2 * KL(original || student).")
    temperature: float = Field(1.0, gt=0, le=20, description="Softmax temperature of the KL.")
    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (cosine schedule).")
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per optimizer step per worker.")
    max_length: int = Field(256, ge=16, le=131_072, description="Tokens per training sequence.")
    data: str = Field("builtin:pydoc-topics", description="Training text: a data file as `homefire train` reads, or "
                      "builtin:pydoc-topics (English prose shipped with Python; not the held-out eval text).")
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (DDP).")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="Logical CPUs per worker.")
    use_gpu: bool = Field(False, description="Train on one GPU per worker.")


class PruneRange(StrictModel):
    """A pruning amount for Optuna to choose (search: optuna): ``method`` at 0, ``step``, ... ``max`` percent removed
    (0 is the unpruned model)."""

    method: Literal["magnitude", "wanda", "mlp", "heads", "layers"] = Field(description="Pruning method.")
    max: int = Field(50, ge=1, le=99, description="Largest percent removed.")
    step: int = Field(5, ge=1, le=99, description="Percent granularity.")


class SpaceSpec(StrictModel):
    """What the sweep tries: one trial per variant (grid search)."""

    quantize: list[str] = Field(
        default_factory=list,
        description="Formats to make and measure (`homefire models convert --to` values): onnx-int4, onnx-int8, "
        "onnx-fp32, gguf-q8_0, gguf-q4_0, gguf-f16, gguf-f32, vllm-w8a8, vllm-w4a16.",
    )
    prune: list[str] = Field(
        default_factory=list,
        description="Pruned variants, `<method>-<percent removed>`: wanda-50, magnitude-50, wanda-2of4 (unstructured, "
        "quality-only), mlp-25, heads-50, layers-25 (structured: smaller and faster). Served on vLLM.",
    )
    prune_then_quantize: bool = Field(
        False, description="Also try every pruned variant in every quantize format (prune-mlp-25+gguf-q4_0).",
    )
    distill: DistillStep | None = Field(
        None, description="Distill every structured pruning from the original before it is measured (or quantized): "
        "prune-layers-25+distill. Also the settings of `distill` steps in chains.",
    )
    prune_range: PruneRange | None = Field(
        None, description="search: optuna only: Optuna chooses the percent removed (with distill, structured ones are "
        "healed), together with a format from quantize (or none).",
    )
    chains: list[str] = Field(
        default_factory=list,
        description="Explicit variants, steps joined by '+': a pruning, `distill`, then a format, e.g. "
        "prune-mlp-25+distill+gguf-q4_0; `kv-fp8` last runs a vLLM-served variant with vLLM's fp8 KV cache "
        "(vllm-w8a8+kv-fp8; kv-fp8 alone: the model itself).",
    )

    @field_validator("quantize")
    @classmethod
    def _known_formats(cls, values: list[str]) -> list[str]:
        from homefire.convert import TARGETS

        unknown = [v for v in values if v not in TARGETS]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(unknown)}; fix: use any of {', '.join(TARGETS)}")
        return _once(values, "a format")

    @field_validator("prune")
    @classmethod
    def _known_pruning(cls, values: list[str]) -> list[str]:
        from homefire.convert import prune

        out = []
        for v in values:
            name = v if v.startswith("prune-") else f"prune-{v}"
            try:
                prune.parse(name)
            except ConfigError as err:
                raise ValueError(str(err).replace("prune-<", "<").replace("'prune-", "'")) from None
            out.append(name)
        return _once(out, "a pruning")

    @field_validator("chains")
    @classmethod
    def _known_chains(cls, values: list[str]) -> list[str]:
        from homefire.convert import TARGETS, prune

        for chain in values:
            steps = chain.split("+")
            for i, step in enumerate(steps):
                if step == "kv-fp8":
                    if i != len(steps) - 1 or (i and steps[i - 1].startswith(("onnx-", "gguf-"))):
                        raise ValueError(f"{chain}: kv-fp8 (vLLM's fp8 KV cache) is the last step of a variant vLLM "
                                         "serves (hf, pruned, distilled, vllm-*); fix: drop it after onnx-/gguf- "
                                         "formats, or move it to the end")
                elif step == "distill":
                    if i == 0 or not steps[i - 1].startswith("prune-"):
                        raise ValueError(f"{chain}: distill follows a pruning (prune-mlp-25+distill); fix: reorder it")
                elif step.startswith("prune-"):
                    try:
                        prune.parse(step)
                    except ConfigError as err:
                        raise ValueError(f"{chain}: {err}") from None
                    if i:
                        raise ValueError(f"{chain}: a pruning comes first; fix: prune-...+distill+<format>")
                elif step not in TARGETS:
                    raise ValueError(f"{chain}: '{step}' is neither a pruning, distill, kv-fp8 nor a format; fix: one "
                                     f"of {', '.join(TARGETS)}")
                elif steps[i + 1:] not in ([], ["kv-fp8"]):
                    raise ValueError(f"{chain}: the format ({step}) is the last step (but for kv-fp8); fix: move it "
                                     "to the end")
        return _once(values, "a chain")

    @model_validator(mode="after")
    def _something(self) -> "SpaceSpec":
        structured_range = self.prune_range is not None and self.prune_range.method in ("mlp", "heads", "layers")
        if self.distill is not None and not any(_structured(p) for p in self.prune) and not any(
                "+distill" in c for c in self.chains) and not structured_range:
            raise ValueError("distill heals structured prunings; none is listed. Fix: add one to space.prune (mlp-25, "
                             "heads-50, layers-25), or drop space.distill")
        if not self.quantize and not self.prune and not self.chains and self.prune_range is None:
            raise ValueError("the space is empty; fix: list formats under space.quantize or prunings under space.prune")
        if self.prune_then_quantize and not (self.quantize and self.prune):
            raise ValueError("prune_then_quantize needs both space.prune and space.quantize; fix: list both, or drop it")
        return self

    def variants(self) -> list[str]:
        """Every variant the space names, in order: formats, prunings, distilled prunings, then each pruning (distilled
        where distillation is on) in each format."""
        distilled = [f"{p}+distill" for p in self.prune if self.distill is not None and _structured(p)]
        final = [f"{p}+distill" if f"{p}+distill" in distilled else p for p in self.prune]
        combos = [f"{p}+{q}" for p in final for q in self.quantize] if self.prune_then_quantize else []
        return list(dict.fromkeys([*self.quantize, *self.prune, *distilled, *combos, *self.chains]))

    def distill_settings(self) -> DistillStep:
        return self.distill or DistillStep()

    def optuna_space(self) -> dict[str, list[str] | tuple[int, int, int]]:
        """What Optuna chooses from: a format (or none) and a pruning (a listed one or a percent of prune_range)."""
        out: dict[str, list[str] | tuple[int, int, int]] = {"quantize": [*self.quantize, "none"]}
        if self.prune_range is not None:
            out["prune_pct"] = (0, self.prune_range.max, self.prune_range.step)
        else:
            out["prune"] = [*self.prune, "none"]
        return out

    def variant_of(self, params: dict[str, Any]) -> str:
        """The variant a point of the Optuna space names (``original`` when it names nothing)."""
        prune = params.get("prune", "none")
        if self.prune_range is not None:
            pct = int(params.get("prune_pct", 0))
            prune = f"prune-{self.prune_range.method}-{pct}" if pct else "none"
        steps = [] if prune == "none" else [prune]
        if steps and self.distill is not None and _structured(prune):
            steps.append("distill")
        if params.get("quantize", "none") != "none":
            steps.append(params["quantize"])
        return "+".join(steps) or "original"



class EvalSpec(StrictModel):
    """Quality: perplexity on held-out text, scored by the engine that serves the variant."""

    text: str | None = Field(None, description="A UTF-8 text file; default: the held-out text shipped with homefire.")
    max_tokens: int = Field(1024, ge=32, le=1_000_000, description="Tokens of the text scored (in context windows).")
    window: int = Field(256, ge=16, le=131_072, description="Tokens per scored window (at most the context length).")
    task: str | None = Field(
        "builtin:pydoc-cloze", description="A task set scored by greedy answers on each variant's engine: a JSONL file "
        "of {prompt|messages, reference}, or builtin:pydoc-cloze (128 passages of Python's docs, next word); null: none.")
    task_match: Literal["exact", "prefix"] = Field("prefix", description="exact: the whole answer is the reference; "
                                                   "prefix: the answer starts with it (cloze).")
    task_max_tokens: int = Field(3, ge=1, le=4096, description="Tokens generated per task answer.")

    @field_validator("task")
    @classmethod
    def _task_loads(cls, value: str | None) -> str | None:
        if value is not None:
            from homefire.evaluation import load_task

            try:
                load_task(value)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return value


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
    gpus_per_trial: float = Field(0.0, ge=0, le=8, description="GPUs each trial reserves (a fraction shares one); "
                                  "the variant's engine and the fp32 reference then run on CUDA.")
    max_concurrent_trials: int = Field(1, ge=1, le=1024, description="Trials at once (one on a 2-core box).")
    storage_path: str | None = Field(None, description="Where trial results go; default $HOMEFIRE_HOME/tune.")
    search: Literal["grid", "optuna"] = Field(
        "grid", description="grid: one trial per variant of the space. optuna: `num_samples` trials chosen by Optuna's "
        "multi-objective TPE (lowest perplexity, highest decode tok/s at select.concurrency) from quantize x prune "
        "(or prune_range), after the original.")
    num_samples: int = Field(12, ge=1, le=10_000, description="search: optuna: trials besides the original.")
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo", description="fifo: every trial measures everything. asha: successive halving on the measurement "
        "stages -- every variant's quality first (perplexity, task), and only those among the best 1/reduction_factor "
        "so far go on to the (slower) speed measurement; the others are reported as stopped.")
    reduction_factor: int = Field(2, ge=2, le=16, description="scheduler: asha: keep the best 1/N at the quality rung.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "TuneConfig":
        if self.search == "grid" and self.space.prune_range is not None:
            raise ValueError("space.prune_range is for search: optuna; fix: set search: optuna, or list prunings "
                             "under space.prune")
        if self.search == "optuna" and (self.space.chains or self.space.prune_then_quantize):
            raise ValueError("search: optuna combines space.quantize and space.prune (or prune_range) itself; fix: drop "
                             "space.chains / space.prune_then_quantize, or use search: grid")
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
    steps = {step for v in cfg.space.variants() for step in v.split("+")}
    if "vllm-w4a16" in steps and "avx512f" not in compressed.cpu_flags() and not compressed._has_cuda():
        out.append("space.quantize: vllm-w4a16 needs AVX-512 (avx512f) or a CUDA GPU, which this machine lacks; "
                   "fix: remove it, or use vllm-w8a8 / gguf-q4_0")
    if "vllm-fp8" in steps and not compressed._has_cuda():
        out.append("space.quantize: vllm-fp8 runs on CUDA GPUs only (fp8 GEMMs: compute capability 8.9+, Marlin "
                   "weight-only on 8.0), and this machine has none; fix: remove it, or use vllm-w8a8 on CPU")
    if cfg.gpus_per_trial > 0 and not compressed._has_cuda():
        out.append(f"gpus_per_trial: {cfg.gpus_per_trial} but this machine has no CUDA GPU; fix: set it to 0 (CPU "
                   "trials), or run the sweep on a GPU node (ray job submit -- homefire tune ...)")
    return out


def check_space(cfg: TuneConfig, src: str | Path) -> None:
    """Refuse, before any trial runs, what the model in ``src`` cannot become: a pruning its shapes do not allow
    (2:4 on a width not divisible by 4, more heads than it has), a format its architecture has no converter for."""
    from homefire.convert import _module, target

    problems = []
    for variant in cfg.space.variants():
        for step in variant.split("+"):
            if step == "kv-fp8":
                problems += _kv_fp8_problems(cfg, Path(src))
                continue
            if step == "distill":
                continue
            try:
                _module(target(step)).check(Path(src), step)
            except ConfigError as err:
                key = "space.prune" if step.startswith("prune-") else "space.quantize"
                problems.append(f"{key}: {err}" if str(err).startswith(step) else f"{key}: {step}: {err}")
    if problems:
        raise ConfigError("the sweep cannot make these variants of " + f"{cfg.model.source}:\n  "
                          + "\n  ".join(dict.fromkeys(problems)))


def _kv_fp8_problems(cfg: TuneConfig, src: Path) -> list[str]:
    from homefire.convert import compressed

    c = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    head = c.get("head_dim") or (c["hidden_size"] // c["num_attention_heads"] if "hidden_size" in c else None)
    if head is not None and head % 32 and not compressed._has_cuda():
        return [f"space.chains: kv-fp8: vLLM's CPU fp8 KV cache needs a head size divisible by 32; this model's is "
                f"{head}. Fix: drop kv-fp8 for this model, or run on a CUDA GPU"]
    return []


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
