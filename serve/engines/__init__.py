"""Engines behind one protocol, loaded lazily by kind so that only the chosen engine's
heavy dependency is imported (exactly one module imports vllm)."""

from __future__ import annotations

import importlib

from homefire.errors import ConfigError
from homefire.serve.engines.protocol import MAX_SCORE_TOP_K, Delta, Engine, SamplingSpec, Scores

#: kind -> "module:Class". `mock` is the test engine for the layers above the engine seam.
ENGINES = {
    "vllm": "homefire.serve.engines.vllm:VLLMEngine",
    "onnx": "homefire.serve.engines.onnx:OnnxEngine",
    "mock": "homefire.serve.engines.mock:MockEngine",
    "llamacpp": "homefire.serve.engines.llamacpp:LlamaCppEngine",
}

_INSTALL_HINT = {
    "vllm": "pip install 'homefire[cpu]' on a CPU machine or 'homefire[gpu]' on a CUDA machine",
    "onnx": "pip install 'homefire[onnx]'",
    "llamacpp": "pip install 'homefire[llamacpp]'",
}


def engine_class(kind: str) -> type:
    """Import and return the engine class for ``kind`` (or a ``module:Class`` path)."""
    target = ENGINES.get(kind, kind)
    if ":" not in target:
        raise ConfigError(f"engine '{kind}' is unknown. Fix: use one of {', '.join(ENGINES)}")
    module, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        hint = _INSTALL_HINT.get(kind, "install the engine's package")
        raise ConfigError(f"engine '{kind}' cannot be imported ({err}). Fix: {hint}") from err


__all__ = ["ENGINES", "MAX_SCORE_TOP_K", "Delta", "Engine", "SamplingSpec", "Scores", "engine_class"]
