"""What the capacity planner reads offline: model shapes (layers, heads, widths, parameter counts) and GPU specs.

A shape comes from the model's own ``config.json`` (a local directory, a registry entry, or a hub id in this machine's
Hugging Face cache), with exact parameter counts from its safetensors headers when those are there; a hub id that is
not on disk falls back to the shipped table of well-known models (``serve/data/model_shapes.yaml``). Nothing here
downloads, and nothing imports torch, transformers or vllm: the files are read as JSON.

GPU types (memory, bandwidth, dense bf16 TFLOPs, a dated on-demand price) come from ``serve/data/gpus.yaml``, which a
user's ``--prices FILE`` of the same shape overrides.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import Field

from homefire.config import StrictModel, load_yaml, validate_config
from homefire.errors import ConfigError, ModelNotFound
from homefire.registry import Registry, parse_ref

SHAPES_FILE = Path(__file__).parent / "data" / "model_shapes.yaml"
GPUS_FILE = Path(__file__).parent / "data" / "gpus.yaml"
#: GPU types a GPU config is planned on when ``--gpu`` names none.
DEFAULT_GPUS = ("h100", "a100-80gb", "l40s", "l4")
#: Bytes per element of the dtypes a safetensors header names; float ones are re-cast to the serving dtype.
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory and compute."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    #: The checkpoint's dtype (config.json ``torch_dtype``).
    torch_dtype: str = "bfloat16"
    #: Mixture of experts: experts per layer and experts each token uses (0: a dense model).
    num_experts: int = 0
    experts_per_token: int = 0
    attention_bias: bool = False
    #: Where the numbers come from, for the output ("config.json in /path", "shipped table ...").
    origin: str = ""
    #: From the safetensors headers, when read: floating-point parameters, and the stored bytes of the rest
    #: (quantized weights and their integer scales keep their size whatever the serving dtype).
    float_params: int | None = None
    other_weight_bytes: int = 0
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], origin: str, **extra: Any) -> "ModelShape":
        """Read a Hugging Face ``config.json`` mapping (a multimodal one through its ``text_config``).

        Raises:
            ConfigError: a key the planner needs is missing, or the attention is one it does not model (MLA).
        """
        text = {**cfg, **(cfg.get("text_config") or {})}
        if text.get("kv_lora_rank"):
            raise ConfigError(f"{origin}: multi-head latent attention (kv_lora_rank) is not modelled by the planner")
        try:
            heads = int(text["num_attention_heads"])
            hidden = int(text["hidden_size"])
            return cls(
                hidden_size=hidden, num_layers=int(text["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
                vocab_size=int(text["vocab_size"]),
                max_position_embeddings=int(text.get("max_position_embeddings") or text.get("n_positions") or 2048),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or "bfloat16"),
                num_experts=int(text.get("num_local_experts") or text.get("num_experts") or 0),
                experts_per_token=int(text.get("num_experts_per_tok") or 0),
                attention_bias=bool(text.get("attention_bias", text.get("model_type") == "qwen2")),
                origin=origin, quantization=cfg.get("quantization_config"), **extra,
            )
        except KeyError as err:
            raise ConfigError(
                f"{origin}: config.json has no '{err.args[0]}', which the planner needs. Fix: point the model's "
                "source at a complete Hugging Face model directory"
            ) from None

    def _mlp(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    def formula_params(self) -> int:
        """Parameters counted from the shape (Llama-style blocks: attention, gated MLP or experts, two norms)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o; k, v
        if self.attention_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * d
        mlp = self.num_experts * self._mlp() + h * self.num_experts if self.num_experts else self._mlp()
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + embeddings + h

    def params(self) -> int:
        """All parameters: the safetensors count when read, else the formula's."""
        return self.float_params if self.float_params is not None and not self.other_weight_bytes else (
            self.formula_params())

    def active_params(self) -> int:
        """Parameters one token passes through (for a mixture of experts: only its experts)."""
        total = self.params()
        if not self.num_experts:
            return total
        idle = self.num_layers * (self.num_experts - self.experts_per_token) * self._mlp()
        return round(total * (1 - idle / self.formula_params()))

    def expert_fraction(self) -> float:
        """The share of all parameters that sits in experts (0 for a dense model)."""
        return self.num_layers * self.num_experts * self._mlp() / self.formula_params() if self.num_experts else 0.0

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Weight memory served at ``dtype_bytes`` per float parameter (quantized tensors keep their stored size)."""
        if self.float_params is not None:
            return self.float_params * dtype_bytes + self.other_weight_bytes
        return self.formula_params() * dtype_bytes


def cpu_dtype_for(quantization: dict[str, Any] | None, has_amx: Callable[[], bool]) -> str:
    """The dtype vLLM's CPU build runs a checkpoint in when the config says ``auto``, from its
    ``quantization_config``.

    float32 (exact, and vLLM CPU's fastest path for small models), except for compressed-tensors checkpoints whose
    CPU kernels take 16-bit activations only: W4A16 (``cpu_gemm_wna16``), and W8A8 on CPUs with AMX (``has_amx``,
    asked only then), where vLLM picks its AMX int8 GEMM (elsewhere W8A8 runs on oneDNN, which takes float32).
    """
    quant = quantization or {}
    if quant.get("quant_method") != "compressed-tensors":
        return "float32"
    groups = list((quant.get("config_groups") or {}).values())
    if any((g.get("weights") or {}).get("num_bits") == 4 for g in groups):
        return "bfloat16"
    int8_activations = any((g.get("input_activations") or {}).get("num_bits") == 8 for g in groups)
    return "bfloat16" if int8_activations and has_amx() else "float32"


def tp_divides(shape: ModelShape, tp: int) -> bool:
    """vLLM's condition for tensor parallelism: TP divides the attention heads, and the KV heads divide by it (or it
    by them: vLLM then replicates each KV head on TP / KV-heads workers)."""
    kv = shape.num_kv_heads
    return shape.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def _safetensors_counts(names: Iterable[str], opener: Callable[[str], IO[bytes]]) -> tuple[int, int] | None:
    """(float parameters, bytes of other tensors) from the headers of the ``*.safetensors`` files; None if none."""
    floats = other = 0
    found = False
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        found = True
        with opener(name) as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, t in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for s in t["shape"]:
                numel *= s
            if t["dtype"] in _FLOAT_BYTES:
                floats += numel
            else:
                other += t["data_offsets"][1] - t["data_offsets"][0]
    return (floats, other) if found else None


def _from_files(names: list[str], opener: Callable[[str], IO[bytes]], origin: str) -> ModelShape:
    with opener("config.json") as f:
        cfg = json.loads(f.read())
    counts = _safetensors_counts(names, opener)
    if counts is None:
        return ModelShape.from_config(cfg, origin)
    return ModelShape.from_config(cfg, origin + " + safetensors headers", float_params=counts[0],
                                  other_weight_bytes=counts[1])


def shape_from_dir(path: str | Path, origin: str | None = None) -> ModelShape:
    """The shape of the Hugging Face model directory ``path`` (its config.json and safetensors headers)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelNotFound(f"{p} has no config.json. Fix: point the model's source at a Hugging Face model directory")
    names = [str(q.relative_to(p)) for q in p.rglob("*.safetensors")]
    return _from_files(["config.json", *names], lambda rel: open(p / rel, "rb"), origin or f"config.json in {p}")


def hf_cache_dir() -> Path:
    """Where the Hugging Face hub cache is on this machine (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _hf_snapshot(hub_id: str) -> Path | None:
    repo = hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    snaps = sorted((s for s in (repo / "snapshots").glob("*") if (s / "config.json").is_file()),
                   key=lambda s: s.stat().st_mtime)
    return snaps[-1] if snaps else None


def shipped_shapes() -> dict[str, dict[str, Any]]:
    """The shipped table: hub id -> config.json numbers."""
    return dict(yaml.safe_load(SHAPES_FILE.read_text())["models"])


def _from_registry(source: str, registry: Registry) -> ModelShape | None:
    name, _, _ = parse_ref(source)
    if not registry.versions(name):
        from homefire.models.build import DEMO_RECIPES

        r = DEMO_RECIPES.get(name)
        if r is None:
            return None
        return ModelShape(
            hidden_size=r.hidden_size, num_layers=r.num_hidden_layers, num_heads=r.num_attention_heads,
            num_kv_heads=r.num_key_value_heads, head_dim=r.hidden_size // r.num_attention_heads,
            intermediate_size=r.intermediate_size, vocab_size=r.vocab_size,
            max_position_embeddings=r.max_position_embeddings, torch_dtype="float32",
            origin=f"demo recipe '{name}' (not built yet; `homefire models build` builds it)",
        )
    entry = registry.get(source, fetch=False)
    if entry.kind == "adapter" and entry.parent:  # an adapter adds little memory: plan its base
        return _from_registry(entry.parent, registry)
    if "config.json" not in entry.files:
        raise ConfigError(f"registry entry {entry.ref} ({entry.format}) has no config.json; the planner sizes "
                          "Hugging Face models served by vLLM")
    return _from_files(list(entry.files), lambda rel: registry.open_file(entry, rel),
                       f"registry entry {entry.ref} (config.json)")


def resolve_shape(source: str, registry: Registry) -> ModelShape:
    """The shape of a model ``source``: a local directory, a registry entry or demo model, or a hub id (from the
    Hugging Face cache, else the shipped table).

    Raises:
        ModelNotFound: naming where it looked and the fix (a local path with the model's config.json).
    """
    p = Path(source).expanduser()
    if p.is_dir():
        return shape_from_dir(p)
    if source.startswith(("/", "./", "~")):
        raise ModelNotFound(f"model path {source} does not exist. Fix: build or copy the model there first")
    if "/" not in source:
        shape = _from_registry(source, registry)
        if shape is not None:
            return shape
        raise ModelNotFound(
            f"model '{source}' is neither a directory, a registry entry ({registry.uri}) nor a hub id. Fix: give a "
            "path to the model's directory, a registry entry (`homefire models list`) or a hub id (org/name)"
        )
    snap = _hf_snapshot(source)
    if snap is not None:
        return shape_from_dir(snap, f"Hugging Face cache {snap}")
    table = {k.lower(): (k, v) for k, v in shipped_shapes().items()}
    if source.lower() in table:
        key, cfg = table[source.lower()]
        return ModelShape.from_config(cfg, f"shipped table (public config.json of {key}; {SHAPES_FILE.name})")
    raise ModelNotFound(
        f"hub id '{source}' is not on this machine (no config.json in the Hugging Face cache {hf_cache_dir()}) and "
        f"not in the shipped table of well-known shapes ({', '.join(sorted(shipped_shapes()))}). Fix: download it "
        "(`huggingface-cli download " + source + " config.json`), or set the model's source to a local directory "
        "holding its config.json"
    )


class GPUSpec(StrictModel):
    """One GPU type of the price table."""

    about: str = Field("", description="What the GPU is (part, memory type).")
    memory_gib: float = Field(gt=0, le=4096, description="Device memory as CUDA reports it, GiB.")
    bandwidth_gbs: float = Field(gt=0, le=100_000, description="Memory bandwidth, GB/s.")
    bf16_tflops: float = Field(gt=0, le=100_000, description="Dense bf16 tensor throughput, TFLOPs.")
    usd_per_hour: float = Field(ge=0, le=10_000, description="On-demand price per GPU-hour, USD.")
    price_source: str = Field("", description="Where the price comes from.")


class GPUTable(StrictModel):
    """GPU types by name (lower case), and when their prices were read."""

    prices_date: str = Field("", description="When the prices were read (YYYY-MM).")
    gpus: dict[str, GPUSpec] = Field(description="GPU name -> its spec and price.")


def load_gpus(prices: str | Path | None = None) -> GPUTable:
    """The shipped GPU table, with ``prices`` (a YAML file of the same shape; a known GPU may give only the keys it
    changes) laid over it.

    Raises:
        ConfigError: a malformed file, or a new GPU without every spec key (named).
    """
    table = validate_config(GPUTable, load_yaml(GPUS_FILE), str(GPUS_FILE))
    if prices is None:
        return table
    data = load_yaml(prices)
    fix = "Fix: write e.g. `gpus: {h100: {usd_per_hour: 2.1}}` (keys: " + ", ".join(GPUSpec.model_fields) + ")"
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), dict) or set(data) - {"gpus", "prices_date"}:
        raise ConfigError(f"{prices}: expected a mapping with `gpus:` (and optionally `prices_date:`). {fix}")
    merged = {name: spec.model_dump() for name, spec in table.gpus.items()}
    for name, over in data["gpus"].items():
        if not isinstance(over, dict):
            raise ConfigError(f"{prices}: gpus.{name} is not a mapping. {fix}")
        merged[str(name).lower()] = {**merged.get(str(name).lower(), {}), **over}
    date = str(data.get("prices_date") or f"{table.prices_date}, overridden by {prices}")
    return validate_config(GPUTable, {"prices_date": date, "gpus": merged}, str(prices))


def pick_gpus(table: GPUTable, names: list[str]) -> dict[str, GPUSpec]:
    """The GPU types ``names`` asks for. Raises ConfigError for an unknown one, listing the known ones."""
    out = {}
    for n in names:
        if n.lower() not in table.gpus:
            raise ConfigError(f"unknown GPU '{n}'. Fix: use one of {', '.join(table.gpus)}, or add it with "
                              "--prices FILE")
        out[n.lower()] = table.gpus[n.lower()]
    return out
