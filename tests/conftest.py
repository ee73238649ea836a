"""Shared fixtures: an isolated homefire home, tiny offline models, a local Ray + Serve per module."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Isolate the registry and caches before homefire reads its constants; removed when pytest exits.
if "HOMEFIRE_HOME" not in os.environ:
    os.environ["HOMEFIRE_HOME"] = tempfile.mkdtemp(prefix="homefire-test-")
    atexit.register(shutil.rmtree, os.environ["HOMEFIRE_HOME"], True)
os.environ.pop("HOMEFIRE_API_KEY", None)

import pytest  # noqa: E402

from homefire.registry import Registry  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The ~0.8M-param offline Llama (tokenizer with chat template, safetensors), built once per session."""
    from homefire.models.build import ensure_model

    return ensure_model("demo-tiny", Registry()).path


@pytest.fixture(scope="session")
def tiny_model_ref(tiny_model_path) -> str:
    """The registry ref of that model (``demo-tiny`` alone may name a newer version a test pretrained)."""
    from homefire.models.build import ensure_model

    return ensure_model("demo-tiny", Registry()).ref


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is; elsewhere they are skipped with the reason."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (CPU box); run on a GPU machine with homefire[gpu]")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
