"""homefire: run your own large language models on your own hardware, on Ray.

The core package stays light: importing it never imports torch, vllm or ray.
Serving lives in :mod:`homefire.serve`.
"""

from homefire.errors import (
    AdapterNotFound,
    ConfigError,
    EngineStartTimeout,
    HomefireError,
    InvalidRequest,
    ModelNotFound,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterNotFound",
    "ConfigError",
    "EngineStartTimeout",
    "HomefireError",
    "InvalidRequest",
    "ModelNotFound",
    "__version__",
]
