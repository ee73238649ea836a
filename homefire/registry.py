"""The registry: the seam between train, tune and serve.

Every model, adapter and optimized variant is an *entry*: name, version, kind, parent
entry, files with sha256, metrics, the config and run that produced it, and when. Entries
live in a directory tree (``<root>/<name>/<version>/``) holding ``entry.json`` and a
``files/`` folder; on a cluster the root is a path every node mounts.

References: ``demo`` (latest version), ``demo@2`` (a version), ``demo:my-adapter``
(an adapter entry named ``my-adapter`` whose parent is ``demo``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from homefire import constants
from homefire.errors import ConfigError, ModelNotFound

Kind = Literal["base", "adapter", "quantized", "converted", "pruned", "distilled"]
#: What an entry's files are, and so which engine can serve them.
Format = Literal["hf", "peft-adapter", "onnx", "gguf", "compressed-tensors"]
#: The engines that serve each format.
FORMAT_ENGINES: dict[str, tuple[str, ...]] = {
    "hf": ("vllm",), "peft-adapter": ("vllm",), "onnx": ("onnx",), "gguf": ("llamacpp",),
    "compressed-tensors": ("vllm",),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REF_RE = re.compile(r"^(?P<name>[^@:]+)(?:@(?P<version>\d+))?(?::(?P<adapter>[^@:]+))?$")


@dataclass(frozen=True)
class Entry:
    """One registered artifact."""

    name: str
    version: int
    kind: str
    path: str
    files: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    run: str | None = None
    recipe_hash: str | None = None
    created: float = 0.0
    #: hf | peft-adapter | onnx | gguf | compressed-tensors (entries written before formats existed are hf/adapters).
    format: str = ""

    def __post_init__(self) -> None:
        if not self.format:
            object.__setattr__(self, "format", "peft-adapter" if self.kind == "adapter" else "hf")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def detect_format(path: str | Path) -> str:
    """The format of a model on disk that is not a registry entry (a plain path)."""
    p = Path(path)
    if p.suffix == ".gguf" or (p.is_dir() and any(p.glob("*.gguf"))):
        return "gguf"
    if (p / "genai_config.json").is_file():
        return "onnx"
    if (p / "adapter_config.json").is_file():
        return "peft-adapter"
    cfg = p / "config.json"
    if cfg.is_file() and "compressed-tensors" in json.dumps(json.loads(cfg.read_text()).get("quantization_config", {})):
        return "compressed-tensors"
    return "hf"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """Split ``name[@version][:adapter]``; raise ConfigError on anything else."""
    m = _REF_RE.match(ref)
    if not m:
        raise ConfigError(f"'{ref}' is not a registry reference. Fix: use name, name@version or name:adapter")
    version = m.group("version")
    return m.group("name"), int(version) if version else None, m.group("adapter")


class Registry:
    """A directory of entries. Writes are atomic (temp dir + rename), so readers never see half an entry."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or constants.REGISTRY_DIR)

    def versions(self, name: str) -> list[int]:
        """The versions of ``name`` (ascending); empty when there is none."""
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "entry.json").is_file())

    def _load(self, name: str, version: int) -> Entry:
        data = json.loads((self.root / name / str(version) / "entry.json").read_text())
        return Entry(**data)

    def list(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            for v in self.versions(d.name):
                out.append(self._load(d.name, v))
        return out

    def get(self, ref: str) -> Entry:
        """Return the entry ``ref`` names (latest version unless ``@N``)."""
        name, version, adapter = parse_ref(ref)
        if adapter is not None:
            name = adapter
        versions = self.versions(name)
        if not versions or (version is not None and version not in versions):
            known = ", ".join(e.ref for e in self.list()) or "none"
            raise ModelNotFound(f"registry entry '{ref}' not found in {self.root}; entries: {known}")
        return self._load(name, version if version is not None else versions[-1])

    def find_by_recipe(self, name: str, recipe_hash: str) -> Entry | None:
        for v in reversed(self.versions(name)):
            e = self._load(name, v)
            if e.recipe_hash == recipe_hash:
                return e
        return None

    def register(
        self,
        name: str,
        src: str | Path,
        kind: Kind = "base",
        *,
        parent: str | None = None,
        metrics: dict | None = None,
        config: dict | None = None,
        run: str | None = None,
        recipe_hash: str | None = None,
        format: Format | None = None,
        move: bool = False,
    ) -> Entry:
        """Copy (or with ``move``, move) the files of directory ``src`` into a new version of ``name``."""
        if not _NAME_RE.match(name):
            raise ConfigError(f"entry name '{name}' is invalid. Fix: use letters, digits, '.', '_' or '-' (max 64)")
        src = Path(src)
        if not src.is_dir():
            raise ConfigError(f"cannot register '{name}': {src} is not a directory")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root / name))
        if move:
            shutil.move(str(src), tmp / "files")
        else:
            shutil.copytree(src, tmp / "files")
        files = {str(p.relative_to(tmp / "files")): sha256_file(p) for p in sorted((tmp / "files").rglob("*")) if p.is_file()}
        for _ in range(100):  # another writer may take the same version: retry with the next one
            version = (self.versions(name) or [0])[-1] + 1
            final = self.root / name / str(version)
            entry = Entry(
                name=name, version=version, kind=kind, path=str(final / "files"), files=files, parent=parent,
                metrics=metrics or {}, config=config or {}, run=run, recipe_hash=recipe_hash, created=time.time(),
                format=format or "",
            )
            (tmp / "entry.json").write_text(json.dumps(asdict(entry), indent=2, sort_keys=True))
            try:
                os.rename(tmp, final)
                return entry
            except OSError:
                continue
        raise ConfigError(f"could not allocate a version for '{name}' in {self.root}")

    def resolve_source(self, source: str) -> str:
        """Turn a model source (registry ref, local path or hub id) into what an engine loads."""
        p = Path(source).expanduser()
        if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
            return str(p.resolve())
        if source.startswith(("/", "./", "~")):
            raise ModelNotFound(f"model path {source} does not exist. Fix: build or copy the model there first")
        name, _, _ = parse_ref(source) if _REF_RE.match(source) else (source, None, None)
        if "/" not in source and (self.root / name).is_dir():
            return self.get(source).path
        if "/" in source:  # a hub id such as "meta-llama/Llama-3.1-8B-Instruct": the engine downloads it
            return source
        known = ", ".join(e.ref for e in self.list()) or "none"
        raise ModelNotFound(
            f"model '{source}' is neither a directory nor a registry entry (registry {self.root}: {known}). "
            "Fix: run `homefire models build` for the demo models, or give a path or hub id"
        )
