"""The capacity planner (``homefire plan``): a serve config in; per model and GPU type, what fits and what it costs.

    homefire plan serve/configs/llama-70b-tp.yaml --gpu h100 --gpu l4 --workload in=2000,out=300,rps=5

For every vLLM model of the config: weight memory, KV-cache bytes per token, the KV-cache tokens and concurrent
sequences that fit in the model's memory share, the smallest tensor-parallel size that fits, roofline estimates of
decode and prefill tokens/s, the replicas the workload needs and what they cost (``serve/data/gpus.yaml``, dated;
``--prices FILE`` overrides it). A CPU model (``gpus: 0``) is planned against the KV cache vLLM's CPU build allocates
(``kv_cache_gb``), sized the way vLLM sizes it, so its tokens and concurrency are the ones vLLM logs at start-up.

Imports neither ray, torch nor vllm; model shapes and GPU specs are read offline (:mod:`homefire.serve.specs`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import ConfigDict, Field, ValidationError

from homefire.config import StrictModel
from homefire.errors import ConfigError
from homefire.registry import Registry
from homefire.serve.config import AppConfig, VLLMModelConfig
from homefire.serve.specs import (
    DEFAULT_GPUS, GPUSpec, GPUTable, ModelShape, cpu_dtype_for, load_gpus, pick_gpus, resolve_shape, tp_divides,
)

GIB = 1 << 30
TP_SIZES = (1, 2, 4, 8)
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class Workload(StrictModel):
    """The traffic to plan for: requests of ``in`` prompt and ``out`` generated tokens, ``rps`` of them a second."""

    model_config = ConfigDict(populate_by_name=True)

    input_tokens: int = Field(2000, ge=1, le=10_000_000, alias="in", description="Prompt tokens per request.")
    output_tokens: int = Field(300, ge=1, le=10_000_000, alias="out", description="Generated tokens per request.")
    rps: float = Field(5.0, gt=0, le=1_000_000, description="Requests per second, all replicas together.")

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def example(cls) -> str:
        return ",".join(f"{f.alias or n}={f.default:g}" for n, f in cls.model_fields.items())

    @classmethod
    def parse(cls, text: str | None) -> "Workload":
        """``in=2000,out=300,rps=5`` (any subset; the rest keep their defaults).

        Raises:
            ConfigError: naming the field and the fix.
        """
        if not text:
            return cls()
        fields = {f.alias or n: f for n, f in cls.model_fields.items()}
        fix = f"--workload {cls.example()}"
        data: dict[str, str] = {}
        for item in text.split(","):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or not key or not value:
                raise ConfigError(f"--workload {text!r}: '{item}' is not FIELD=VALUE. Fix: {fix}")
            if key not in fields:
                raise ConfigError(f"--workload: unknown field '{key}'. Fix: use {', '.join(fields)}, e.g. {fix}")
            data[key] = value
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            e = err.errors()[0]
            key = str(e["loc"][0])
            raise ConfigError(
                f"--workload {key}={data.get(key)!r}: {e['msg']}. Fix: set {key} to the "
                f"{fields[key].description.lower().rstrip('.')}, e.g. {fix}"
            ) from None


@dataclass(frozen=True)
class Assumptions:
    """The planner's stated assumptions, printed with every plan."""

    #: Share of HBM bandwidth a decode step achieves (every step reads the GPU's weights and its batch's KV cache).
    decode_bandwidth_efficiency: float = 0.7
    #: Share of dense bf16 TFLOPs a prefill (and a compute-bound decode step) achieves.
    compute_efficiency: float = 0.5
    #: Throughput kept per doubling of the tensor-parallel size (all-reduce between GPUs).
    tp_efficiency_per_doubling: float = 0.9
    #: Per GPU, besides weights and activations: CUDA context, cuBLAS/NCCL workspaces, CUDA graphs.
    gpu_fixed_overhead_gib: float = 1.0
    #: A whole GPU's memory share when the config gives none (vLLM's default gpu_memory_utilization).
    gpu_memory_utilization: float = 0.9


@dataclass(frozen=True)
class EngineSettings:
    """What vLLM will run the model with: the config's keys and engine_args, else vLLM's defaults."""

    dtype: str
    kv_dtype_bytes: int
    max_model_len: int
    block_size: int
    #: vLLM's scheduler defaults for an engine built as homefire builds it (AsyncLLM.from_engine_args).
    max_num_seqs: int
    max_num_batched_tokens: int


def _has_amx() -> bool:
    """torch's AMX check (what vLLM's CPU build asks), read from the kernel without importing torch."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def engine_settings(m: VLLMModelConfig, shape: ModelShape, on_gpu: bool) -> EngineSettings:
    """The dtypes, context, block size and batch limits vLLM runs ``m`` with, on a GPU or on the CPU build."""
    ea = m.engine_args
    if m.dtype != "auto":
        dtype = m.dtype
    elif not on_gpu:
        dtype = cpu_dtype_for(shape.quantization, _has_amx)
    else:  # vLLM on CUDA: the checkpoint's 16-bit dtype; a float32 checkpoint is cast to bfloat16
        dtype = shape.torch_dtype if shape.torch_dtype in ("bfloat16", "float16") else "bfloat16"
    kv = str(ea.get("kv_cache_dtype", "auto"))
    kv_bytes = _DTYPE_BYTES[dtype] if kv == "auto" else 1 if kv.startswith("fp8") else _DTYPE_BYTES.get(kv, 2)
    return EngineSettings(
        dtype=dtype, kv_dtype_bytes=kv_bytes, max_model_len=m.max_model_len or shape.max_position_embeddings,
        block_size=int(ea.get("block_size") or (16 if on_gpu else 128)),  # vLLM's CPU platform defaults to 128
        # vLLM's SchedulerConfig defaults: homefire builds its engines without an OpenAI-server usage context.
        max_num_seqs=int(ea.get("max_num_seqs") or 128),
        max_num_batched_tokens=int(ea.get("max_num_batched_tokens") or 2048),
    )


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    """KV heads one GPU holds: split across TP, replicated once TP exceeds their count (as vLLM does)."""
    return max(1, shape.num_kv_heads // tp)


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int, tp: int = 1) -> int:
    """KV-cache bytes one token takes on one GPU: 2 (K, V) x layers x KV heads per GPU x head_dim x dtype bytes."""
    return 2 * shape.num_layers * kv_heads_per_gpu(shape, tp) * shape.head_dim * dtype_bytes


def kv_capacity(space_bytes: int, shape: ModelShape, s: EngineSettings, tp: int = 1) -> tuple[int, int, float]:
    """(blocks, KV-cache tokens, max concurrency at max_model_len), as vLLM v1 computes them (kv_cache_utils): whole
    blocks of ``block_size`` tokens over every layer; a request at max_model_len takes cdiv(max_model_len, block_size)
    blocks; the tokens it logs are int(concurrency x max_model_len)."""
    blocks = max(0, space_bytes) // (s.block_size * kv_bytes_per_token(shape, s.kv_dtype_bytes, tp))
    concurrency = blocks / math.ceil(s.max_model_len / s.block_size)
    return blocks, int(concurrency * s.max_model_len), concurrency


@dataclass
class PlanRow:
    """One model on one target (``cpu`` or a GPU type), at the tensor-parallel size that fits."""

    target: str
    tp: int
    memory_share: float
    fits: bool
    weights_gib_per_gpu: float
    overhead_gib_per_gpu: float
    kv_space_gib_per_gpu: float
    kv_bytes_per_token_per_gpu: int
    kv_blocks: int
    #: vLLM's "KV cache size: N tokens" and "Maximum concurrency for <max_model_len> tokens per request".
    kv_tokens: int
    max_concurrency: float
    #: Requests of the workload (in + out tokens) whose KV cache fits at once, and the decode batch (<= max_num_seqs).
    workload_seqs: int
    batch: int
    decode_tps_one: float | None = None
    decode_tps_batch: float | None = None
    prefill_tps: float | None = None
    replicas: int | None = None
    gpus_total: float | None = None
    usd_per_hour: float | None = None
    usd_per_m_output: float | None = None
    usd_per_m_output_saturated: float | None = None
    #: Why this row is shown: "smallest TP", "gpus: N" (as configured), "cheapest", "does not fit".
    role: str = ""
    note: str = ""


@dataclass
class ModelPlan:
    """One served model: its shape, what vLLM runs it with, and a row per target."""

    name: str
    source: str
    origin: str
    engine: str
    params: int = 0
    active_params: int = 0
    shape: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_formula: str = ""
    rows: list[PlanRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None


def _throughput(row: PlanRow, shape: ModelShape, gpu: GPUSpec, w: Workload, a: Assumptions, weights: float,
                share_of_gpu: float = 1.0) -> None:
    """Decode (memory-bandwidth roofline, compute-capped) and prefill (compute roofline) rates, replicas and cost.
    A replica on a fraction of a GPU gets that fraction of its time (the replicas sharing it are busy too)."""
    tp = row.tp
    scale = a.tp_efficiency_per_doubling ** math.log2(tp) * share_of_gpu
    bw = gpu.bandwidth_gbs * 1e9 * a.decode_bandwidth_efficiency
    flops = gpu.bf16_tflops * 1e12 * a.compute_efficiency
    attn = shape.num_layers * shape.num_heads * shape.head_dim
    ctx = w.input_tokens + w.output_tokens / 2  # a sequence's mean context while it decodes

    def step_s(batch: int) -> float:
        read = weights
        if shape.num_experts:  # experts no token of the batch routes to are not read
            touched = 1 - (1 - shape.experts_per_token / shape.num_experts) ** batch
            read = weights * (1 - shape.expert_fraction() * (1 - touched))
        mem = (read + batch * ctx * row.kv_bytes_per_token_per_gpu) / bw
        compute = batch * (2 * shape.active_params() + 4 * ctx * attn) / tp / flops
        return max(mem, compute) / scale

    row.decode_tps_one = 1 / step_s(1)
    row.decode_tps_batch = row.batch / step_s(row.batch) if row.batch else None
    n = w.input_tokens
    prefill_s = max((2 * shape.active_params() * n + 2 * n * n * attn) / tp / flops, weights / bw) / scale
    row.prefill_tps = n / prefill_s
    if not row.decode_tps_batch:
        return
    per_request_s = w.input_tokens / row.prefill_tps + w.output_tokens / row.decode_tps_batch  # replica-seconds
    replica_usd = tp * share_of_gpu * gpu.usd_per_hour
    row.replicas = max(1, math.ceil(w.rps * per_request_s - 1e-9))
    row.gpus_total = row.replicas * tp * share_of_gpu
    row.usd_per_hour = row.replicas * replica_usd
    row.usd_per_m_output = row.usd_per_hour / (w.rps * w.output_tokens * 3600) * 1e6
    row.usd_per_m_output_saturated = replica_usd / (w.output_tokens / per_request_s * 3600) * 1e6


def _row(target: str, tp: int, share: float, space: float, weights: float, overhead: float, shape: ModelShape,
         s: EngineSettings, w: Workload) -> PlanRow:
    blocks, tokens, conc = kv_capacity(int(space), shape, s, tp)
    seqs = blocks // math.ceil(w.tokens / s.block_size) if w.tokens <= s.max_model_len else 0
    return PlanRow(
        target=target, tp=tp, memory_share=share, fits=conc >= 1, weights_gib_per_gpu=weights / GIB,
        overhead_gib_per_gpu=overhead / GIB, kv_space_gib_per_gpu=max(0.0, space) / GIB,
        kv_bytes_per_token_per_gpu=kv_bytes_per_token(shape, s.kv_dtype_bytes, tp), kv_blocks=blocks,
        kv_tokens=tokens, max_concurrency=conc, workload_seqs=seqs, batch=min(seqs, s.max_num_seqs),
    )


def cpu_kv_cache_gib(m: VLLMModelConfig) -> int:
    """The KV cache vLLM's CPU build allocates for ``m``: VLLM_CPU_KVCACHE_SPACE (whole GiB), which the engine sets
    from ``kv_cache_gb`` unless the environment already does (``homefire.serve.engines.vllm``)."""
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    return int(env) if env else max(1, int(m.kv_cache_gb))


def _gpu_rows(m: VLLMModelConfig, shape: ModelShape, name: str, gpu: GPUSpec, w: Workload,
              a: Assumptions) -> list[PlanRow]:
    """The model on GPU type ``name``: the smallest TP that fits, and where they differ from it, the TP the config
    runs (``tensor_parallel``, or ``gpus``) and the TP that serves the workload cheapest."""
    s = engine_settings(m, shape, on_gpu=True)
    whole = m.gpu_memory_utilization or a.gpu_memory_utilization
    # The config's TP: tensor_parallel when set (a CPU config's too, planned here on GPUs), else what gpus runs.
    config_tp = m.tp if m.tensor_parallel is not None or m.gpus >= 1 else None
    key = (f"tensor_parallel: {m.tp}" if m.tensor_parallel is not None else f"gpus: {int(m.gpus)}") if config_tp else ""
    tries = [(tp, whole, 1.0) for tp in sorted({*TP_SIZES, config_tp or 1}) if tp_divides(shape, tp)]
    if 0 < m.gpus < 1:
        tries = [(1, m.memory_share(), m.gpus)] + tries
    rows = []
    for tp, share, fraction in tries:
        weights = shape.weight_bytes(_DTYPE_BYTES[s.dtype]) / tp
        acts = s.max_num_batched_tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size
                                           * max(1, shape.experts_per_token) / tp) * _DTYPE_BYTES[s.dtype]
        overhead = a.gpu_fixed_overhead_gib * GIB + acts + s.max_num_seqs * shape.vocab_size * 4  # + fp32 logits
        row = _row(name, tp, share, gpu.memory_gib * GIB * share - weights - overhead, weights, overhead, shape, s, w)
        if row.fits:
            _throughput(row, shape, gpu, w, a, weights, fraction)
            rows.append(row)
        if fraction < 1 and row.fits:
            row.role = f"gpus: {m.gpus:g}"
            row.note = "shares a GPU: throughput and cost are its share of the GPU's time"
            return rows
    if not rows:
        row.role = "does not fit"
        row.note = (f"does not fit on {row.tp} x {name}. Fix: a GPU with more memory, a shorter max_model_len, a "
                    "quantized variant, or pipeline parallelism across nodes")
        return [row]
    first = rows[0]
    first.role = "smallest TP"
    if 0 < m.gpus < 1:
        first.note = f"does not fit in gpus: {m.gpus:g}; planned on whole GPUs"
    elif m.gpus == 0:
        first.note = "the config runs this model on CPU (gpus: 0); planned here on whole GPUs"
    shown = [first]
    configured = next((r for r in rows if config_tp and r.tp == config_tp), None)
    if configured is not None and configured is not first:
        configured.role = key
        shown.append(configured)
    elif configured is None and config_tp:
        first.note = (f"at the config's {key} (TP {config_tp}) it does not fit" if config_tp in (t for t, _, _ in tries)
                      else f"the config's {key} is no TP size this model splits into ({shape.num_heads} heads, "
                      f"{shape.num_kv_heads} KV heads)")
    cheapest = min((r for r in rows if r.usd_per_hour is not None), key=lambda r: r.usd_per_hour, default=None)
    if cheapest is not None and cheapest not in shown and cheapest.usd_per_hour < min(
            r.usd_per_hour or math.inf for r in shown):
        cheapest.role = "cheapest"
        shown.append(cheapest)
    return sorted(shown, key=lambda r: r.tp)


def plan_model(m, registry: Registry, gpus: dict[str, GPUSpec], w: Workload, a: Assumptions) -> ModelPlan:
    """The plan for one served model (vLLM only; other engines are listed as skipped)."""
    plan = ModelPlan(name=m.name, source=m.source, origin="", engine=m.engine)
    if not isinstance(m, VLLMModelConfig):
        plan.skipped = f"engine {m.engine}: the planner sizes vLLM's KV cache and batching only"
        return plan
    shape = resolve_shape(m.source, registry)
    on_gpu = m.gpus > 0
    s = engine_settings(m, shape, on_gpu)
    plan.origin, plan.params, plan.active_params = shape.origin, shape.params(), shape.active_params()
    plan.shape = {k: v for k, v in asdict(shape).items() if k not in ("origin", "quantization")}
    plan.settings = asdict(s)
    plan.weight_bytes = shape.weight_bytes(_DTYPE_BYTES[s.dtype])
    plan.kv_bytes_per_token = kv_bytes_per_token(shape, s.kv_dtype_bytes)
    plan.kv_formula = (f"2 x {shape.num_layers} layers x {shape.num_kv_heads} KV heads x {shape.head_dim} x "
                       f"{s.kv_dtype_bytes} B")
    if w.tokens > s.max_model_len:
        plan.notes.append(f"a workload request ({w.input_tokens} + {w.output_tokens} tokens) is longer than "
                          f"max_model_len {s.max_model_len}: vLLM refuses it. Fix: raise max_model_len, or plan "
                          f"shorter requests (--workload in=...,out=...)")
    if m.max_loras:
        plan.notes.append(f"max_loras {m.max_loras}: the LoRA slots' memory is not counted")
    if m.pipeline_parallel > 1:
        plan.notes.append(f"pipeline_parallel {m.pipeline_parallel}: rows plan tensor parallelism only; each of the "
                          f"{m.pipeline_parallel} stages holds about 1/{m.pipeline_parallel} of the layers, so weights "
                          "and KV cache per GPU divide by that too")
    if not on_gpu:
        gib = cpu_kv_cache_gib(m)
        # Each CPU worker allocates the whole KV space for its share of the KV heads.
        row = _row("cpu", m.tp, 0.0, gib * GIB, plan.weight_bytes / m.tp, 0, shape, s, w)
        row.role = "gpus: 0" if row.fits else "does not fit"
        row.note = (f"vLLM CPU KV cache {gib} GiB (VLLM_CPU_KVCACHE_SPACE, from kv_cache_gb); no throughput roofline "
                    "for CPUs: measure with benchmarks/serve_bench.py")
        if not row.fits:
            row.note += f"; fix: kv_cache_gb >= {math.ceil(s.max_model_len * plan.kv_bytes_per_token / GIB)}"
        plan.rows.append(row)
    plan.rows += [r for name, gpu in gpus.items() for r in _gpu_rows(m, shape, name, gpu, w, a)]
    return plan


def plan_app(cfg: AppConfig, gpus: dict[str, GPUSpec], workload: Workload | None = None,
             registry: Registry | None = None, assumptions: Assumptions | None = None) -> list[ModelPlan]:
    """Plan every model of ``cfg`` on the CPU (models with ``gpus: 0``) and on each of ``gpus``.

    Raises:
        ModelNotFound: a model's shape cannot be read offline (the message names the fix).
    """
    registry = registry or (Registry(cfg.registry) if cfg.registry else Registry())
    return [plan_model(m, registry, gpus, workload or Workload(), assumptions or Assumptions()) for m in cfg.models]


def _size(b: float) -> str:
    return f"{b / GIB:.1f} GiB" if abs(b) >= GIB else f"{b / (1 << 20):.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _cells(r: PlanRow) -> list[str]:
    def num(x: float | None, fmt: str = "{:,.0f}") -> str:
        return "-" if x is None else fmt.format(x)

    decode = "-" if r.decode_tps_one is None else f"{r.decode_tps_one:,.0f} | {num(r.decode_tps_batch)}"
    return [
        r.target, str(r.tp) if r.fits else f">{r.tp}", "-" if r.target == "cpu" else f"{r.memory_share:.2f}",
        _size(r.weights_gib_per_gpu * GIB), _size(r.kv_space_gib_per_gpu * GIB), f"{r.kv_tokens:,}",
        f"{r.max_concurrency:,.2f}", f"{r.workload_seqs:,}", decode, num(r.prefill_tps), num(r.replicas),
        num(r.usd_per_hour, "{:,.2f}"), num(r.usd_per_m_output, "{:,.2f}"), r.role,
    ]


def assumptions_line(a: Assumptions, table: GPUTable) -> str:
    return (
        f"Throughput, replicas and cost are estimates, not measurements: decode = memory-bandwidth roofline x "
        f"{a.decode_bandwidth_efficiency:.2f} (each step reads the GPU's weights and its batch's KV cache; capped by "
        f"compute), prefill = dense bf16 compute roofline x {a.compute_efficiency:.2f}, x "
        f"{a.tp_efficiency_per_doubling:.2f} per TP doubling; decode batch = the workload's sequences that fit, at "
        f"most max_num_seqs; dtypes as listed per model.\nKV space per GPU = memory x share - weights/TP - "
        f"{a.gpu_fixed_overhead_gib:g} GiB (CUDA context, workspaces, CUDA graphs) - one max_num_batched_tokens "
        f"step's activations - max_num_seqs x vocab fp32 logits. KV tokens and concurrency follow vLLM's own block "
        f"sizing.\nreplicas = ceil(rps x (in/prefill + out/decode)). Prices: on-demand list prices per GPU-hour as of "
        f"{table.prices_date} (serve/data/gpus.yaml; override with --prices FILE)."
    )


def format_plans(plans: list[ModelPlan], w: Workload, table: GPUTable, a: Assumptions) -> str:
    """The plans as text: a table per model, then the assumptions."""
    out = [f"workload: {w.input_tokens:,} prompt + {w.output_tokens:,} generated tokens per request, {w.rps:g} "
           "requests/s", ""]
    for p in plans:
        out.append(f"{p.name}: {p.source}" + (f" (shape: {p.origin})" if p.origin else ""))
        if p.skipped:
            out += [f"  skipped: {p.skipped}", ""]
            continue
        sh, st = p.shape, p.settings
        moe = (f", {sh['num_experts']} experts ({sh['experts_per_token']} per token: {_count(p.active_params)} "
               "active)" if sh["num_experts"] else "")
        out.append(f"  {sh['num_layers']} layers, hidden {sh['hidden_size']}, {sh['num_heads']} heads / "
                   f"{sh['num_kv_heads']} KV heads x {sh['head_dim']}, intermediate {sh['intermediate_size']}, vocab "
                   f"{sh['vocab_size']:,}{moe}: {_count(p.params)} parameters")
        out.append(f"  weights {_size(p.weight_bytes)} ({st['dtype']}); KV cache {p.kv_bytes_per_token:,} B/token "
                   f"= {p.kv_formula}; max_model_len {st['max_model_len']:,}, block {st['block_size']}, max_num_seqs "
                   f"{st['max_num_seqs']}")
        header = ["target", "TP", "share", "weights/GPU", "KV/GPU", "KV tokens", f"conc@{st['max_model_len']}",
                  f"seqs@{w.tokens}", "decode tok/s 1|batch", "prefill tok/s", "replicas", "$/hour", "$/M out", "row"]
        grid = [header] + [_cells(r) for r in p.rows]
        widths = [max(len(row[i]) for row in grid) for i in range(len(header))]
        out += [("  " + "  ".join(c.ljust(wd) if i in (0, len(row) - 1) else c.rjust(wd)
                                  for i, (c, wd) in enumerate(zip(row, widths)))).rstrip() for row in grid]
        out += [f"  {r.target if r.target == 'cpu' else f'{r.target} TP {r.tp}'}: {r.note}" for r in p.rows if r.note]
        out += [f"  note: {n}" for n in p.notes] + [""]
    out.append(assumptions_line(a, table))
    return "\n".join(out)


def plans_json(plans: list[ModelPlan], w: Workload, table: GPUTable, a: Assumptions) -> dict:
    return {
        "workload": w.model_dump(by_alias=True), "assumptions": asdict(a), "prices_date": table.prices_date,
        "estimates": assumptions_line(a, table), "models": [asdict(p) for p in plans],
    }


@dataclass(frozen=True)
class PlanOptions:
    """What ``homefire plan`` was asked (see ``homefire plan --help``)."""

    config: str | None = None
    gpus: tuple[str, ...] = ()
    workload: str | None = None
    prices: str | None = None
    as_json: bool = False


def run_plan(opts: PlanOptions) -> int:
    """Load the config, plan it, print the tables (or JSON). Returns the exit status."""
    from homefire.serve.builders import app_config_from_file, load_app_config

    cfg = app_config_from_file(opts.config) if opts.config else load_app_config(None)
    w = Workload.parse(opts.workload)
    table = load_gpus(opts.prices)
    on_cpu = all(getattr(m, "gpus", 0) == 0 for m in cfg.models)
    gpus = pick_gpus(table, list(opts.gpus) or ([] if on_cpu else list(DEFAULT_GPUS)))
    a = Assumptions()
    plans = plan_app(cfg, gpus, w, assumptions=a)
    print(json.dumps(plans_json(plans, w, table, a), indent=2) if opts.as_json else format_plans(plans, w, table, a))
    return 0
