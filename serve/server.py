"""The model replica: one engine and the OpenAI layer over it.

Plain class; :mod:`homefire.serve.builders` turns it into a Serve deployment with the
model's placement and autoscaling options.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from homefire import constants
from homefire.serve.config import ModelConfig
from homefire.serve.engines import engine_class
from homefire.serve.protocol import ChatCompletionRequest, CompletionRequest
from homefire.serve.serving import OpenAIServing

logger = logging.getLogger(__name__)


class ModelServer:
    """Holds one engine for one model version; methods are called through Serve handles."""

    async def __init__(self, model: dict[str, Any], model_path: str, stream_interval_s: float = 0.0):
        from transformers import AutoTokenizer

        self.cfg = ModelConfig.model_validate(model)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=self.cfg.trust_remote_code)
        self.engine = engine_class(self.cfg.engine)(self.cfg, model_path)
        await self.engine.start(constants.ENGINE_START_TIMEOUT_S)
        self.serving = OpenAIServing(self.cfg.name, self.engine, tokenizer, stream_interval_s)
        logger.info("model %s ready (engine %s, max_model_len %d)", self.cfg.name, self.cfg.engine, self.engine.max_model_len)

    async def chat(self, request: ChatCompletionRequest, adapter: str | None = None) -> AsyncIterator[str | dict]:
        async for item in self.serving.chat(request, adapter):
            yield item

    async def completion(self, request: CompletionRequest, adapter: str | None = None) -> AsyncIterator[str | dict]:
        async for item in self.serving.completion(request, adapter):
            yield item

    async def info(self) -> dict[str, Any]:
        return {
            "model": self.cfg.name,
            "engine": self.cfg.engine,
            "max_model_len": self.engine.max_model_len,
            "adapters": self.engine.adapters(),
            "stats": self.engine.stats(),
        }

    async def load_adapter(self, name: str, path: str) -> None:
        await self.engine.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.engine.unload_adapter(name)

    async def check_health(self) -> None:
        """Called by Serve's controller; raising marks the replica unhealthy and replaces it."""
        await self.engine.check_health()

    async def __del__(self):
        await self.engine.shutdown()
