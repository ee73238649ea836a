"""Make optimized formats of a model: ``homefire models convert <entry> --to <target>``.

Each target names a format (what the files are, so which engine serves them) and a
precision. A conversion reads a Hugging Face model directory (a registry entry, a demo
name or a path), writes the new files into a scratch directory and registers them as a
new entry whose ``parent`` is the source and whose ``config`` records the recipe. A
failed conversion registers nothing.

One module per format imports that format's library: :mod:`.onnx` (onnxruntime-genai's
model builder), :mod:`.gguf` (the ``gguf`` package), :mod:`.compressed` (compressed-tensors
for vLLM), :mod:`.prune` (``prune-<method>-<percent>``: smaller or sparser hf models). Each exposes ``check(src, target)`` (refuse early, naming what is wrong) and
``convert(src, out, target) -> dict`` (the files, plus facts worth keeping in the entry).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError
from homefire.registry import Entry, Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One ``--to`` choice."""

    format: str
    kind: str
    module: str
    #: What the target is, for --help and errors.
    about: str


TARGETS: dict[str, Target] = {
    "onnx-int4": Target("onnx", "quantized", "onnx", "ONNX Runtime, int4 weights (MatMulNBits), fp32 activations"),
    "onnx-int8": Target("onnx", "quantized", "onnx", "ONNX Runtime, int8 weights, fp32 activations"),
    "onnx-fp32": Target("onnx", "converted", "onnx", "ONNX Runtime, fp32 (lossless)"),
    "gguf-q8_0": Target("gguf", "quantized", "gguf", "llama.cpp, 8-bit blocks of 32"),
    "gguf-q4_0": Target("gguf", "quantized", "gguf", "llama.cpp, 4-bit blocks of 32"),
    "gguf-f16": Target("gguf", "converted", "gguf", "llama.cpp, float16"),
    "gguf-f32": Target("gguf", "converted", "gguf", "llama.cpp, float32 (lossless)"),
    "vllm-w8a8": Target("compressed-tensors", "quantized", "compressed", "vLLM, int8 weights and activations"),
    "vllm-w4a16": Target(
        "compressed-tensors", "quantized", "compressed", "vLLM, int4 weights, 16-bit activations (AVX-512 on CPU)"
    ),
    "vllm-fp8": Target(
        "compressed-tensors", "quantized", "compressed", "vLLM, fp8 weights and activations (CUDA GPUs only)"
    ),
}

#: Pruning targets are a family, ``prune-<method>-<percent removed | 2of4>`` (see :mod:`.prune`).
PRUNE_TARGETS = ("prune-wanda-50", "prune-magnitude-2of4", "prune-mlp-25", "prune-heads-25", "prune-layers-25")

_INSTALL_HINT = {
    "onnx": "pip install 'homefire[onnx]'",
    "gguf": "pip install 'homefire[llamacpp]'",
    "compressed": "pip install 'homefire[cpu]' (compressed-tensors comes with vLLM)",
}


def _module(target: Target):
    name = f"homefire.convert.{target.module}"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(
            f"--to {target.format}: the converter cannot be imported ({err}). Fix: {_INSTALL_HINT[target.module]}"
        ) from err


def target(name: str) -> Target:
    """The target called ``name``; ConfigError listing the choices otherwise."""
    if name.startswith("prune-"):
        from homefire.convert import prune

        return Target("hf", "pruned", "prune", prune.parse(name).about)
    if name not in TARGETS:
        raise ConfigError(f"--to '{name}' is not a known format. Fix: use one of {', '.join(TARGETS)}, "
                          "or prune-<wanda|magnitude|mlp|heads|layers>-<percent removed | 2of4>")
    return TARGETS[name]


def hf_architecture(src: Path) -> str:
    """The ``architectures[0]`` of a Hugging Face model directory; ConfigError when it is not one."""
    cfg = src / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"{src} has no config.json: it is not a Hugging Face model directory. Fix: convert an hf entry")
    archs = json.loads(cfg.read_text()).get("architectures") or ["?"]
    return archs[0]


def convert(source: str, to: str, registry: Registry | None = None, name: str | None = None,
            force: bool = False) -> Entry:
    """Convert ``source`` (registry ref, demo name or path) to ``to`` and register the result.

    Args:
        source: the model to convert (an ``hf`` entry, a demo model name, or a model directory).
        to: a key of :data:`TARGETS`, e.g. ``onnx-int4`` or ``gguf-q8_0``, or a pruning target (``prune-mlp-25``).
        registry: where to read and write entries (default: ``HOMEFIRE_REGISTRY``).
        name: the new entry's name (default ``<source name>-<to>``).
        force: convert again even when this registry entry was already converted to ``to`` (by content hash).

    Returns:
        The new registry entry (``format`` and ``parent`` set).

    Raises:
        ConfigError: unknown target, a source that is not an hf model, an architecture or shape the format cannot
            hold, or a machine that cannot make it; nothing is registered.
    """
    from homefire.models.build import resolve_source

    tgt = target(to)
    registry = registry or Registry()
    path, entry = resolve_source(source, registry)
    src = Path(path)
    if entry is not None and entry.format != "hf":
        raise ConfigError(
            f"'{source}' is a {entry.format} entry; converters read hf models. Fix: convert its parent "
            f"({entry.parent or 'the original model'})"
        )
    if not src.is_dir():
        raise ConfigError(f"'{source}' is not a local model directory (hub ids are not downloaded here). Fix: pass a path")
    mod = _module(tgt)
    mod.check(src, to)
    base_name = entry.name if entry is not None else src.name
    new_name = name or f"{base_name}-{to}"
    # The same weights converted the same way are the same entry: a second `convert` returns it.
    recipe_hash = None
    if entry is not None:
        recipe_hash = hashlib.sha256(json.dumps([entry.files, to], sort_keys=True).encode()).hexdigest()
        done = None if force else registry.find_by_recipe(new_name, recipe_hash)
        if done is not None:
            logger.info("%s is %s converted to %s already", done.ref, entry.ref, to)
            return registry.fetch(done)
    registry.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=registry.root) as tmp:
        out = Path(tmp) / "files"
        out.mkdir()
        facts: dict[str, Any] = mod.convert(src, out, to) or {}
        seconds = round(time.perf_counter() - started, 2)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        new = registry.register(
            new_name, out, kind=tgt.kind, format=tgt.format,
            parent=entry.ref if entry is not None else str(src),
            metrics={"size_bytes": size, "convert_s": seconds},
            config={"recipe": {"to": to, "source": entry.ref if entry is not None else str(src), **facts}},
            run=f"homefire models convert {source} --to {to}", recipe_hash=recipe_hash, move=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    logger.info("converted %s -> %s (%s, %.1f MB, %.0fs)", source, new.ref, to, size / 1e6, seconds)
    return new


__all__ = ["PRUNE_TARGETS", "TARGETS", "Target", "convert", "hf_architecture", "target"]
