"""The ONNX Runtime engine: an ``onnx`` registry entry (``homefire models convert X --to onnx-int4``)
served by onnxruntime-genai.

The only module in homefire that imports onnxruntime_genai.

ONNX Runtime GenAI has no continuous batching: each choice of each request is one
``og.Generator`` whose token loop runs in a worker thread, at most ``max_concurrency``
of them at once (the rest wait their turn). Tokens come back to the event loop through
``loop.call_soon_threadsafe``; stop strings and incremental detokenization are
:class:`~homefire.serve.engines.text.IncrementalText`'s. Cancelling a stream stops its
threads before their next token and frees their slots.

What it supports, and how:
    * sampling: ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``seed`` (choice ``i`` uses
      ``seed + i``), ``repetition_penalty``; no presence/frequency penalties (og has none);
    * ``min_tokens`` / ``ignore_eos`` through og's ``min_length`` (the end-of-sequence token is
      masked until then; a stop string can still end the text earlier);
    * ``response_format`` (JSON schema / any JSON object) through og's llguidance, compact
      JSON (no free whitespace, as the vLLM engine does);
    * :meth:`OnnxEngine.score`: per-token log-probabilities of a text, for perplexity;
    * providers: ``cpu``; ``cuda`` (onnxruntime-genai-cuda); ``tensorrt``, which in
      onnxruntime-genai 0.18 is NVIDIA's TensorRT-RTX execution provider plugin
      (``onnxruntime-ep-nv-tensorrt-rtx``). ``threads`` sets the session's
      ``intra_op_num_threads``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError, EngineError, EngineStartTimeout, InvalidRequest
from homefire.serve.config import OnnxModelConfig
from homefire.serve.engines.protocol import (
    Capabilities, Delta, NoAdapters, SamplingSpec, Scores, check_score_request,
)
from homefire.serve.engines.text import HFTokenizer, IncrementalText

logger = logging.getLogger(__name__)

#: homefire provider -> onnxruntime-genai provider name, and what has to be installed for it.
_PROVIDERS: dict[str, tuple[str, str]] = {
    "cuda": ("cuda", "onnxruntime-genai-cuda (pip install 'homefire[tensorrt]')"),
    "tensorrt": (
        "NvTensorRtRtx",
        "onnxruntime-genai-cuda and NVIDIA's TensorRT-RTX execution provider "
        "(pip install 'homefire[tensorrt]')",
    ),
}
_TRT_RTX_MODULE = "onnxruntime_ep_nv_tensorrt_rtx"


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver reports a GPU to this process (without importing torch or CUDA)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


class _Choice:
    """One sequence's state, shared between its worker thread and the event loop."""

    def __init__(self, index: int, stop: threading.Event):
        self.index = index
        self.stop = stop


class OnnxEngine(NoAdapters):
    """onnxruntime-genai behind the homefire engine protocol.

    Args:
        cfg: the model's serve settings (``engine: onnx``).
        model_path: a directory written by ``homefire models convert --to onnx-*`` (``genai_config.json``,
            ``model.onnx``, the Hugging Face tokenizer files).

    Example:
        >>> engine = OnnxEngine(model_config({"name": "tiny", "source": "demo-tiny-onnx-int4", "engine": "onnx"}), path)
        >>> await engine.start(timeout_s=60)
        >>> async for delta in engine.generate("r1", engine.tokenizer.encode("Hello"), SamplingSpec(max_tokens=16)):
        ...     print(delta.text, end="")
    """

    capabilities = Capabilities(lora=False, structured_output=True, n=True, penalties=False, min_tokens=True)
    engine_label = "ONNX Runtime"

    def __init__(self, cfg: OnnxModelConfig, model_path: str):
        self.cfg = cfg
        self.model_path = model_path
        genai_path = Path(model_path) / "genai_config.json"
        if not genai_path.is_file():
            raise ConfigError(
                f"model '{cfg.name}': {model_path} has no genai_config.json, so it is not an ONNX Runtime GenAI model. "
                f"Fix: convert it first (homefire models convert {cfg.source} --to onnx-int4) and serve that entry"
            )
        genai = json.loads(genai_path.read_text())["model"]
        self.context_length = int(genai["context_length"])
        eos = genai.get("eos_token_id", [])
        self._eos: frozenset[int] = frozenset(eos if isinstance(eos, list) else [eos])
        self._vocab_size = int(genai.get("vocab_size", 0))
        if cfg.max_model_len is not None and cfg.max_model_len > self.context_length:
            raise ConfigError(
                f"model '{cfg.name}': max_model_len {cfg.max_model_len} exceeds the ONNX model's context_length "
                f"{self.context_length}. Fix: set max_model_len <= {self.context_length} or leave it unset"
            )
        self.max_model_len = cfg.max_model_len or self.context_length
        self.tokenizer: HFTokenizer | None = None
        self._og: Any = None
        self._model: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._requests = 0
        self._running = 0
        self._stops: set[threading.Event] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def _check_provider(self) -> None:
        """ConfigError, before anything loads, when the configured provider cannot run here."""
        provider = self.cfg.provider
        if provider == "cpu":
            return
        og_name, needs = _PROVIDERS[provider]
        missing = []
        if not nvidia_gpu_present():
            missing.append("this machine has no NVIDIA GPU")
        elif not self._og.is_cuda_available():
            missing.append("the installed onnxruntime-genai is the CPU build")
        if provider == "tensorrt" and importlib.util.find_spec(_TRT_RTX_MODULE) is None:
            missing.append(f"{_TRT_RTX_MODULE} is not installed")
        if missing:
            raise ConfigError(
                f"model '{self.cfg.name}': provider '{provider}' needs an NVIDIA GPU with {needs}; "
                f"{'; '.join(missing)}. Fix: set provider: cpu, or serve it on a GPU node with those packages"
            )

    def _og_config(self) -> Any:
        og = self._og
        config = og.Config(self.model_path)
        if self.cfg.threads is not None:
            config.overlay(json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": self.cfg.threads}}}}
            ))
        config.clear_providers()  # the file may name a provider; homefire's config decides
        if self.cfg.provider == "tensorrt":
            import onnxruntime_ep_nv_tensorrt_rtx as trt_rtx  # type: ignore[import-not-found]

            og.register_execution_provider_library(trt_rtx.get_ep_name(), trt_rtx.get_library_path())
        if self.cfg.provider != "cpu":
            config.append_provider(_PROVIDERS[self.cfg.provider][0])
        return config

    def _load(self) -> None:
        self.tokenizer = HFTokenizer(self.model_path, trust_remote_code=self.cfg.trust_remote_code, name=self.cfg.name)
        self._model = self._og.Model(self._og_config())

    async def start(self, timeout_s: float) -> None:
        """Load the model (in a thread); ConfigError for a provider this machine lacks, EngineStartTimeout past
        ``timeout_s``."""
        try:
            import onnxruntime_genai as og
        except ImportError as err:
            raise ConfigError(
                f"engine 'onnx' needs onnxruntime-genai ({err}). Fix: pip install 'homefire[onnx]'"
            ) from err
        self._og = og
        self._check_provider()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._load), timeout_s)
        except asyncio.TimeoutError:
            raise EngineStartTimeout(
                f"ONNX Runtime engine for '{self.cfg.name}' did not load within {timeout_s:.0f}s; "
                "fix: raise HOMEFIRE_ENGINE_START_TIMEOUT_S or check the replica's log"
            ) from None
        except Exception as err:  # og raises a bare RuntimeError for a bad model or provider
            raise EngineError(f"ONNX Runtime could not load '{self.cfg.name}' from {self.model_path}: {err}") from err
        self._executor = ThreadPoolExecutor(self.cfg.max_concurrency, thread_name_prefix=f"onnx-{self.cfg.name}")
        self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        logger.info("onnx engine %s loaded from %s (provider %s)", self.cfg.name, self.model_path, self.cfg.provider)

    async def check_health(self) -> None:
        if self._model is None:
            raise EngineError(f"engine for '{self.cfg.name}' is not started")

    async def shutdown(self) -> None:
        for stop in list(self._stops):
            stop.set()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None
        self._model = None

    # -- generation --------------------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._model is None or self._slots is None:
            raise EngineError(f"engine for '{self.cfg.name}' is not started")

    def _search_options(self, prompt_len: int, s: SamplingSpec, index: int) -> dict[str, Any]:
        max_length = min(prompt_len + s.max_tokens, self.max_model_len)
        greedy = s.temperature == 0
        opts: dict[str, Any] = {
            "max_length": max_length,
            "do_sample": not greedy,
            # genai_config.json carries the builder's defaults (top_k 50): always say what the request asked.
            "top_k": self._vocab_size if s.top_k <= 0 else min(s.top_k, self._vocab_size),
            "top_p": s.top_p,
            "temperature": s.temperature if not greedy else 1.0,
            "repetition_penalty": s.repetition_penalty,
            # og's min_length counts the prompt; up to it the end-of-sequence token is masked.
            "min_length": max_length if s.ignore_eos else min(prompt_len + s.min_tokens, max_length),
        }
        if s.seed is not None:
            opts["random_seed"] = (s.seed + index) % (1 << 31)
        return opts

    @staticmethod
    def _guidance(s: SamplingSpec) -> tuple[str, str] | None:
        if s.json_schema is None and not s.json_object:
            return None
        schema = dict(s.json_schema) if s.json_schema is not None else {"type": "object"}
        # Compact JSON: a weak model cannot then loop on whitespace until max_tokens.
        schema.setdefault("x-guidance", {"whitespace_flexible": False})
        return "json_schema", json.dumps(schema)

    def _decode(
        self, choice: _Choice, prompt: list[int], s: SamplingSpec, guidance: tuple[str, str] | None,
        emit: Callable[[Delta | BaseException], None],
    ) -> None:
        """One sequence's token loop (a worker thread). Emits deltas; the last has finish_reason set."""
        import numpy as np

        og = self._og
        try:
            params = og.GeneratorParams(self._model)
            params.set_search_options(**self._search_options(len(prompt), s, choice.index))
            if guidance is not None:
                try:
                    params.set_guidance(*guidance)
                except Exception as err:  # llguidance rejects the schema
                    raise InvalidRequest(f"response_format cannot be enforced: {err}", param="response_format") from err
            gen = og.Generator(self._model, params)
            gen.append_tokens(np.asarray(prompt, dtype=np.int32))
            text = IncrementalText(self.tokenizer.decode, s.stop)
            produced = pending = 0
            while not choice.stop.is_set():
                if gen.is_done():
                    emit(Delta(choice.index, text.flush(), pending, "length"))
                    return
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
                produced += 1
                pending += 1
                if token in self._eos:
                    emit(Delta(choice.index, text.flush(), pending, "stop"))
                    return
                piece = text.push(token)
                if text.stopped:
                    emit(Delta(choice.index, piece, pending, "stop"))
                    return
                if produced >= s.max_tokens:
                    emit(Delta(choice.index, piece + text.flush(), pending, "length"))
                    return
                if piece:
                    emit(Delta(choice.index, piece, pending))
                    pending = 0
        except InvalidRequest as err:
            emit(err)
        except Exception as err:  # og raises RuntimeError for anything the runtime rejects
            emit(EngineError(f"ONNX Runtime failed generating for '{self.cfg.name}': {err}"))

    async def _run_choice(
        self, choice: _Choice, prompt: list[int], s: SamplingSpec, guidance: tuple[str, str] | None,
        emit: Callable[[Delta | BaseException], None],
    ) -> None:
        async with self._slots:
            if choice.stop.is_set():
                return
            self._running += 1
            try:
                fut = asyncio.get_running_loop().run_in_executor(
                    self._executor, self._decode, choice, prompt, s, guidance, emit
                )
                # Never leave the slot while the thread still runs: on cancel, stop it and wait for it (one token).
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    choice.stop.set()
                    await asyncio.wait({fut})
                    raise
            finally:
                self._running -= 1

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec, adapter: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream deltas for ``sampling.n`` choices of one prompt (see the module docstring for what is honoured)."""
        self.refuse_adapter(adapter)
        self._require_started()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt_token_ids)} tokens; model '{self.cfg.name}' holds {self.max_model_len} "
                "(prompt + completion). Fix: shorten the prompt",
                param="messages",
            )
        guidance = self._guidance(sampling)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def emit(item: Delta | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        stop = threading.Event()
        self._stops.add(stop)
        self._requests += 1
        choices = [_Choice(i, stop) for i in range(sampling.n)]
        tasks = [
            asyncio.create_task(
                self._run_choice(c, prompt_token_ids, sampling, guidance, emit), name=f"{request_id}:{c.index}"
            )
            for c in choices
        ]
        try:
            open_choices = sampling.n
            while open_choices:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_choices -= 1
                yield item
        finally:
            stop.set()
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._stops.discard(stop)
            self._requests -= 1

    # -- scoring -----------------------------------------------------------------------------------------------

    def _score(self, token_ids: list[int], top_k: int) -> Scores:
        import numpy as np

        og = self._og
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(token_ids), do_sample=False)
        gen = og.Generator(self._model, params)
        gen.append_tokens(np.asarray(token_ids, dtype=np.int32))
        logits = np.asarray(gen.get_output("logits"))[0, :-1]  # [n-1, vocab]
        return Scores.from_logits(logits, token_ids[1:], top_k)

    async def score(self, token_ids: list[int], top_k: int = 0) -> Scores:
        """Log-probabilities of ``token_ids[i]`` given ``token_ids[:i]``, for i = 1 .. n-1, and the ``top_k`` most
        likely tokens at each (one forward pass).

        Perplexity is ``exp(-mean(score(ids).logprobs))``. Raises InvalidRequest for fewer than 2 tokens or more than
        ``max_model_len``, or a ``top_k`` over MAX_SCORE_TOP_K.
        """
        self._require_started()
        check_score_request(token_ids, top_k, self.max_model_len)
        async with self._slots:
            self._running += 1
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor, self._score, list(token_ids), top_k)
            except Exception as err:
                raise EngineError(f"ONNX Runtime failed scoring for '{self.cfg.name}': {err}") from err
            finally:
                self._running -= 1

    # -- gauges ------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "unfinished_requests": self._requests,
            "running_sequences": self._running,
            "max_concurrency": self.cfg.max_concurrency,
        }
