"""The model replica: one engine and the OpenAI layer over it.

Plain class; :mod:`homefire.serve.builders` turns it into a Serve deployment with the
model's placement and autoscaling options.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from homefire import constants
from homefire.errors import AdapterNotFound, ConfigError, EngineDead, EngineStartTimeout, InvalidRequest, ModelNotFound
from homefire.registry import Registry
from homefire.serve.config import model_config
from homefire.serve.engines import engine_class
from homefire.serve.protocol import ChatCompletionRequest, CompletionRequest, NativeRequest
from homefire.serve.serving import OpenAIServing

logger = logging.getLogger(__name__)


class ModelServer:
    """Holds one engine for one model version; methods are called through Serve handles."""

    async def __init__(
        self, model: dict[str, Any], model_path: str, stream_interval_s: float = 0.0,
        registry_root: str | None = None, base_ref: str | None = None, restart_in_place: bool = False,
    ):
        """``restart_in_place``: a dead engine is replaced inside this replica (requests wait for it) instead of
        the replica exiting; for a replica that also serves HTTP (:mod:`homefire.serve.local`), whose exit would drop
        every connection it holds."""
        self.cfg = model_config(model)
        self.model_path = model_path
        self.base_ref = base_ref or model_path
        self.registry = Registry(registry_root) if registry_root else Registry()
        self._adapter_lock = asyncio.Lock()
        self._adapter_checked: dict[str, float] = {}  # adapter -> when its registry version was last checked
        self._stream_interval_s = stream_interval_s
        self._restart_in_place = restart_in_place
        self._ready = asyncio.Event()
        self._stopping = False
        await self._start_engine()

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> ModelServer:
        """Build one outside Serve (``__init__`` is async, as Serve allows)."""
        self = cls.__new__(cls)
        await self.__init__(*args, **kwargs)
        return self

    async def _start_engine(self) -> None:
        self.engine = engine_class(self.cfg.engine)(self.cfg, self.model_path)
        await self.engine.start(constants.ENGINE_START_TIMEOUT_S)
        self.serving = OpenAIServing(self.cfg.name, self.engine, self._stream_interval_s)
        # The engine's own OpenAI layer, for what homefire's request models do not cover (vLLM: logprobs, tools,
        # the Responses API, embeddings ...).
        self.native_layer = await self.engine.openai_layer() if self.engine.capabilities.native_openai else None
        self._adapter_checked.clear()  # a new engine holds no adapters: the next request for one loads it
        self._watchdog = asyncio.create_task(self._watch_engine())
        self._ready.set()
        logger.info("model %s ready (engine %s, max_model_len %d)", self.cfg.name, self.cfg.engine, self.engine.max_model_len)

    @property
    def restarting(self) -> bool:
        return not self._ready.is_set()

    async def chat(self, request: ChatCompletionRequest, adapter: str | None = None) -> AsyncIterator[str | dict]:
        async for item in self._answer("chat", request, adapter):
            yield item

    async def completion(self, request: CompletionRequest, adapter: str | None = None) -> AsyncIterator[str | dict]:
        async for item in self._answer("completion", request, adapter):
            yield item

    async def native(self, request: NativeRequest, adapter: str | None = None) -> AsyncIterator[str | dict]:
        """A request for the engine's own OpenAI layer (see :class:`~homefire.serve.protocol.NativeRequest`)."""
        async for item in self._answer("native", request, adapter):
            yield item

    async def _answer(self, shape, request, adapter: str | None) -> AsyncIterator[str | dict]:
        """The serving layer's ``shape`` ("chat" or "completion") for ``request``; a dead engine ends this replica or
        is replaced in it. While it is being replaced, requests wait (the ingress bounds the wait)."""
        await self._ready.wait()
        if adapter is not None:
            await self.ensure_adapter(adapter)
        if shape == "native":  # the ingress sends these only to a model whose engine has its own OpenAI layer
            answer = self.native_layer.respond(request, adapter, self._stream_interval_s)
        elif self.cfg.task != "generate":
            raise InvalidRequest(f"model '{self.cfg.name}' is an embedding model (task: {self.cfg.task}); send it "
                                 "POST /v1/embeddings", param="model", code="unsupported_by_model")
        else:
            answer = getattr(self.serving, shape)(request, adapter)
        try:
            async for item in answer:
                yield item
        except EngineDead as err:
            self._engine_died(err)
            raise

    async def _watch_engine(self) -> None:
        """Notice a dead engine within ``ENGINE_WATCH_S``, whether or not a request is running."""
        while not self._stopping:
            await asyncio.sleep(constants.ENGINE_WATCH_S)
            try:
                await asyncio.wait_for(self.engine.check_health(), constants.HEALTH_CHECK_TIMEOUT_S)
            except asyncio.TimeoutError:
                continue  # slow, not dead: Serve's own health check (30 s, three strikes) judges a hung engine
            except Exception as err:
                if not self._stopping:
                    self._engine_died(err)
                return

    def _engine_died(self, err: BaseException) -> None:
        """A replica whose engine died is worth nothing as it is. Behind a separate ingress it leaves at once, so
        the router stops choosing it (the requests it held are retried by the ingress) and Serve starts a fresh
        replica in its place. A replica that serves HTTP itself starts a new engine in place instead: no connection
        is dropped, the requests that got no output yet wait for the new engine, and the replica's own start (a
        process importing Ray, torch and vLLM) is saved."""
        if self._stopping or not self._ready.is_set():
            return
        if not self._restart_in_place:
            logger.error("model %s: the engine died (%s); this replica exits so Serve replaces it", self.cfg.name, err)
            self._exit()
            return
        self._ready.clear()
        logger.error("model %s: the engine died (%s); starting a new one in this replica", self.cfg.name, err)
        self._restart = asyncio.create_task(self._restart_engine())

    async def _restart_engine(self) -> None:
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.engine.shutdown(), constants.HEALTH_CHECK_TIMEOUT_S)
        except Exception as err:  # a dead engine may not shut down cleanly; its processes die with their parent
            logger.warning("model %s: the dead engine did not shut down cleanly: %s", self.cfg.name, err)
        try:
            await self._start_engine()
        except Exception:
            logger.exception("model %s: the new engine did not start; this replica exits so Serve replaces it",
                             self.cfg.name)
            self._exit()
            return
        logger.warning("model %s: new engine serving %.1fs after the old one died", self.cfg.name,
                       time.monotonic() - started)

    def _exit(self) -> None:
        self._stopping = True
        # A moment for the answers already failing (EngineDead, retried by the ingress) to leave this process.
        asyncio.get_running_loop().call_later(0.2, os._exit, 1)

    async def ensure_adapter(self, name: str) -> str:
        """Load adapter ``name`` from the registry unless this replica has it; returns its registry ref.

        Every replica resolves adapters itself, so one started later by autoscaling serves them too; a
        newer registry version of a loaded adapter (retrained under the same name) replaces it within
        ``ADAPTER_REFRESH_S``, or at once through ``load_adapter``.
        Raises AdapterNotFound (404) for an unknown adapter or one trained on another base model, and
        InvalidRequest (400) when this model's engine serves no adapters.
        """
        if not self.engine.capabilities.lora or not getattr(self.cfg, "max_loras", 0):
            raise InvalidRequest(
                f"model '{self.cfg.name}' is served without LoRA support (engine {self.cfg.engine}"
                f"{', max_loras 0' if self.engine.capabilities.lora else ''}). Fix: serve the adapter's base model "
                "on vLLM with max_loras > 0 in its serve config",
                param="model", code="adapters_unsupported",
            )
        recent = time.monotonic() - self._adapter_checked.get(name, -1e9) < constants.ADAPTER_REFRESH_S
        if recent and self.engine.adapter_path(name) is not None:
            return name
        async with self._adapter_lock:
            entry = self._adapter_entry(name)
            if self.engine.adapter_path(name) == entry.path:
                self._adapter_checked[name] = time.monotonic()
                return entry.ref
            try:
                await asyncio.wait_for(self.engine.load_adapter(name, entry.path), constants.ADAPTER_LOAD_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise EngineStartTimeout(
                    f"adapter '{name}' did not load within {constants.ADAPTER_LOAD_TIMEOUT_S:.0f}s "
                    "(HOMEFIRE_ADAPTER_LOAD_TIMEOUT_S)"
                ) from None
            logger.info("model %s: loaded adapter %s (%s)", self.cfg.name, name, entry.ref)
            self._adapter_checked[name] = time.monotonic()
            return entry.ref

    def _adapter_entry(self, name: str):
        """The newest version of adapter ``name`` trained on the base this replica serves."""
        try:
            versions = self.registry.adapter_versions(name)
        except ConfigError:
            versions = []
        if not versions:
            available = self.available_adapters()
            raise AdapterNotFound(
                f"adapter '{name}' is not in the registry for model '{self.cfg.name}'; available: "
                f"{', '.join(f'{self.cfg.name}:{a}' for a in available) or 'none'}. Fix: train one with `homefire train`",
                param="model", code="adapter_not_found",
            )
        entry = next((e for e in versions if self._fits(e)), None)
        if entry is None:
            bases = ", ".join(sorted({e.parent or "?" for e in versions}))
            raise AdapterNotFound(
                f"adapter '{name}' was trained on {bases}, but '{self.cfg.name}' serves {self.base_ref}. "
                "Fix: serve the adapter's base model, or retrain the adapter on this one",
                param="model", code="adapter_base_mismatch",
            )
        return entry

    def _fits(self, entry) -> bool:
        parent = entry.parent or ""
        if parent == self.base_ref:
            return True
        try:
            return self.registry.get(parent, fetch=False).path == self.model_path
        except (ModelNotFound, ConfigError):
            return parent == self.model_path

    def available_adapters(self) -> list[str]:
        """Registry adapters trained on the base this replica serves."""
        return sorted({e.name for e in self.registry.list() if e.kind == "adapter" and self._fits(e)})

    async def info(self) -> dict[str, Any]:
        return {
            "model": self.cfg.name,
            "engine": self.cfg.engine,
            "max_model_len": self.engine.max_model_len,
            "adapters": self.engine.adapters(),
            "available_adapters": self.available_adapters(),
            "stats": self.engine.stats(),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's controller polls this every ``request_routing_stats_period_s`` and hands it to the callers'
        routers (:mod:`homefire.serve.routing`), which show it per replica in ``GET /v1/status``."""
        return {"restarting": True} if self.restarting else self.engine.stats()

    async def load_adapter(self, name: str) -> dict[str, Any]:
        self._adapter_checked.pop(name, None)  # an explicit load always looks for a newer version
        ref = await self.ensure_adapter(name)
        return {"model": f"{self.cfg.name}:{name}", "entry": ref}

    async def unload_adapter(self, name: str) -> None:
        await self.engine.unload_adapter(name)

    async def check_health(self) -> None:
        """Called by Serve's controller; raising marks the replica unhealthy and replaces it. An engine being
        replaced in place is not unhealthy: the restart ends the replica itself if it fails."""
        if self._ready.is_set():
            await self.engine.check_health()

    async def __del__(self):
        self._stopping = True
        if (watchdog := getattr(self, "_watchdog", None)) is not None:  # an engine that never started has none
            watchdog.cancel()
        await self.engine.shutdown()
