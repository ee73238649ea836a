"""A mock engine for tests of the layers above the engine seam (routing, autoscaling,
placement, errors, metrics). It uses the model's real tokenizer and emits pseudo-random
tokens at a configurable pace; it never claims to be a model.

Its settings (:class:`~homefire.serve.config.MockModelConfig`): ``token_delay_s``,
``start_delay_s``, ``fail_after_tokens`` (raise mid-stream after that many), ``max_model_len`` (512).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

from homefire.errors import AdapterNotFound, EngineError, EngineStartTimeout
from homefire.serve.config import MockModelConfig
from homefire.serve.engines.protocol import Capabilities, Delta, SamplingSpec
from homefire.serve.engines.text import HFTokenizer

_WORDS = "the a model token replica serve ray engine fire home quick brown fox jumps over lazy dog".split()


class MockEngine:
    capabilities = Capabilities(lora=True, structured_output=False, n=True, penalties=True, min_tokens=True)

    def __init__(self, cfg: MockModelConfig, model_path: str):
        self.cfg = cfg
        self.model_path = model_path
        self.token_delay_s = cfg.token_delay_s
        self.start_delay_s = cfg.start_delay_s
        self.fail_after_tokens = cfg.fail_after_tokens
        self.max_model_len = cfg.max_model_len or 512
        self._adapters: dict[str, str] = {}
        self._running = 0
        self._started = False

    async def start(self, timeout_s: float) -> None:
        if self.start_delay_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise EngineStartTimeout(f"mock engine did not start within {timeout_s}s")
        await asyncio.sleep(self.start_delay_s)
        self.tokenizer = HFTokenizer(self.model_path, self.cfg.trust_remote_code, name=self.cfg.name)
        self._started = True

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec, adapter: str | None = None
    ) -> AsyncIterator[Delta]:
        if adapter is not None and adapter not in self._adapters:
            raise AdapterNotFound(f"adapter '{adapter}' is not loaded", param="model")
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        rngs = [random.Random(f"{seed}:{i}:{adapter}") for i in range(sampling.n)]
        self._running += 1
        try:
            for step in range(sampling.max_tokens):
                if self.fail_after_tokens is not None and step >= int(self.fail_after_tokens):
                    raise EngineError("mock engine failure (fail_after_tokens)")
                await asyncio.sleep(self.token_delay_s)
                last = step == sampling.max_tokens - 1
                for i, rng in enumerate(rngs):
                    yield Delta(i, " " + rng.choice(_WORDS), 1, "length" if last else None)
        finally:
            self._running -= 1

    async def check_health(self) -> None:
        if not self._started:
            raise EngineError("mock engine not started")

    async def load_adapter(self, name: str, path: str) -> None:
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def adapter_path(self, name: str) -> str | None:
        return self._adapters.get(name)

    def stats(self) -> dict[str, Any]:
        return {"unfinished_requests": self._running}

    async def shutdown(self) -> None:
        self._started = False
