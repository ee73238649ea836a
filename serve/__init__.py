"""homefire.serve: several models on Ray Serve behind one OpenAI-compatible API.

``homefire.serve:build_app`` is the builder Serve config files name; ``plan_app`` sizes a config for GPU types
without starting anything (``homefire plan``).
"""

if __name__ != "homefire.serve":  # the folder is mapped into the homefire namespace
    raise ImportError(
        f"'{__name__}' was imported from the repository's serve/ folder; import it as homefire.serve "
        "(pip install -e . maps serve/ to homefire.serve)"
    )

from homefire.serve.builders import build_app, load_app_config
from homefire.serve.config import (
    AppConfig,
    AutoscalingConfig,
    LlamaCppModelConfig,
    MockModelConfig,
    ModelConfig,
    OnnxModelConfig,
    ServerConfig,
    VLLMModelConfig,
    model_config,
)
from homefire.serve.plan import Workload, plan_app

__all__ = [
    "AppConfig", "AutoscalingConfig", "LlamaCppModelConfig", "MockModelConfig", "ModelConfig", "OnnxModelConfig",
    "ServerConfig", "VLLMModelConfig", "Workload", "build_app", "load_app_config", "model_config", "plan_app",
]
