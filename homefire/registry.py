"""The registry: the seam between train, tune and serve.

Every model, adapter and optimized variant is an *entry*: name, version, kind, format, parent
entry, files with sha256, metrics, the config and run that produced it, and when. Entries
live in a tree (``<root>/<name>/<version>/``) holding ``entry.json`` and a ``files/`` folder.
The root is a local directory by default, or any fsspec URI (``s3://bucket/registry``, ``gs://``,
``abfs://``, ``file://``) so every node of a cluster sees the same registry; entries of a remote
registry are downloaded (sha256-checked) into a local cache the first time a node loads them.
``entry.json`` is written last: a reader never sees half an entry.

References: ``demo`` (latest version), ``demo@2`` (a version), ``demo:my-adapter`` (the newest adapter
``my-adapter`` trained on any version of ``demo``), ``demo@2:my-adapter`` (the newest one trained on ``demo@2``).
Adapters are looked up under their base: two bases may each have an adapter of the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

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
    """Versioned entries on a local directory or an fsspec URI.

    ``uri`` is where entries live; ``root`` is a local directory: the registry itself when it is local, the cache of
    a remote one otherwise (entry ``path``\ s point there). Local writes are atomic (temp dir + rename); remote writes
    put ``entry.json`` last.
    """

    def __init__(self, root: str | Path | None = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.uri = str(root or constants.REGISTRY_DIR)
        try:
            self.fs, base = fsspec.core.url_to_fs(self.uri)
        except (ImportError, ValueError) as err:
            raise ConfigError(
                f"registry {self.uri}: {err}. Fix: install the fsspec filesystem for it (s3fs, gcsfs, adlfs) or set "
                "HOMEFIRE_REGISTRY to a local directory"
            ) from err
        self.local = isinstance(self.fs, LocalFileSystem)
        self._base = base.rstrip("/")
        if self.local:
            self.root = Path(base)
        else:
            key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            self.root = constants.HOME_DIR / "registry-cache" / key

    def _remote(self, *parts: str | int) -> str:
        return "/".join([self._base, *map(str, parts)])

    def versions(self, name: str) -> list[int]:
        """The versions of ``name`` (ascending); empty when there is none."""
        if self.local:
            d = self.root / name
            if not d.is_dir():
                return []
            return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "entry.json").is_file())
        found = self.fs.glob(self._remote(name, "*", "entry.json"))
        return sorted(int(p.rstrip("/").split("/")[-2]) for p in found if p.rstrip("/").split("/")[-2].isdigit())

    def _names(self) -> list[str]:
        if self.local:
            return sorted(d.name for d in self.root.iterdir() if d.is_dir()) if self.root.is_dir() else []
        if not self.fs.exists(self._base):
            return []
        return sorted({p.rstrip("/").split("/")[-1] for p in self.fs.ls(self._base, detail=False)})

    def _load(self, name: str, version: int) -> Entry:
        if self.local:
            data = json.loads((self.root / name / str(version) / "entry.json").read_text())
        else:
            data = json.loads(self.fs.cat_file(self._remote(name, version, "entry.json")))
        # Files are where this node sees them (a shared mount may sit at another path on each node).
        data["path"] = str(self.root / name / str(version) / "files")
        return Entry(**data)

    def list(self) -> list[Entry]:
        return [self._load(name, v) for name in self._names() for v in self.versions(name)]

    def fetch(self, entry: Entry) -> Entry:
        """Make ``entry``'s files present at ``entry.path`` (a no-op on a local registry); sha256-checked."""
        if self.local:
            return entry
        local = Path(entry.path)
        done = local.parent / ".complete"
        if done.is_file():
            return entry
        tmp = local.parent.parent / f".fetch-{uuid.uuid4().hex}"
        try:
            self.fs.get(self._remote(entry.name, entry.version, "files") + "/", str(tmp / "files"), recursive=True)
            for rel, digest in entry.files.items():
                if sha256_file(tmp / "files" / rel) != digest:
                    raise ConfigError(f"registry entry {entry.ref}: {rel} does not match its sha256 in {self.uri}")
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(local, ignore_errors=True)
            os.rename(tmp / "files", local)
            done.touch()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return entry

    def open_file(self, entry: Entry, rel: str) -> IO[bytes]:
        """Open one of ``entry``'s files for reading (binary) without fetching the others: this node's copy when it
        has one, else the registry's (what the capacity planner reads: config.json, safetensors headers)."""
        local = Path(entry.path) / rel
        if self.local or local.is_file():
            return open(local, "rb")
        return self.fs.open(self._remote(entry.name, entry.version, "files", rel), "rb")

    def get(self, ref: str, fetch: bool = True) -> Entry:
        """Return the entry ``ref`` names (latest version unless ``@N``; ``base:adapter`` looks under ``base``).

        On a remote registry the entry's files are downloaded to ``entry.path`` first, unless ``fetch`` is False.
        """
        name, version, adapter = parse_ref(ref)
        if adapter is not None:
            entry = self.adapter(name if version is None else f"{name}@{version}", adapter)
        else:
            versions = self.versions(name)
            if not versions or (version is not None and version not in versions):
                known = ", ".join(e.ref for e in self.list()) or "none"
                raise ModelNotFound(f"registry entry '{ref}' not found in {self.uri}; entries: {known}")
            entry = self._load(name, version if version is not None else versions[-1])
        return self.fetch(entry) if fetch else entry

    def adapter_versions(self, name: str) -> list[Entry]:
        """Every version of adapter ``name``, newest first (metadata only: files are not fetched)."""
        if not _NAME_RE.match(name):
            raise ConfigError(f"'{name}' is not an adapter name. Fix: use letters, digits, '.', '_' or '-' (max 64)")
        return [e for e in (self._load(name, v) for v in reversed(self.versions(name))) if e.kind == "adapter"]

    def adapter(self, base: str, name: str) -> Entry:
        """The newest adapter ``name`` trained on ``base`` (``demo``: any version of demo; ``demo@2``: that one)."""
        base_name, base_version, _ = parse_ref(base)
        versions = self.adapter_versions(name)
        for e in versions:
            parent_name, parent_version, _ = parse_ref(e.parent) if e.parent and _REF_RE.match(e.parent) else ("", None, None)
            if parent_name == base_name and (base_version is None or parent_version == base_version):
                return e
        trained_on = sorted({e.parent or "?" for e in versions})
        where = f"it exists for {', '.join(trained_on)}" if trained_on else "there is no adapter of that name"
        raise ModelNotFound(
            f"adapter '{name}' of '{base}' not found in {self.uri} ({where}). "
            f"Fix: train one on {base} with `homefire train`, or name the base it was trained on"
        )

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
        files = {str(p.relative_to(src)): sha256_file(p) for p in sorted(src.rglob("*")) if p.is_file()}

        def entry_for(version: int) -> Entry:
            return Entry(
                name=name, version=version, kind=kind, path=str(self.root / name / str(version) / "files"), files=files,
                parent=parent, metrics=metrics or {}, config=config or {}, run=run, recipe_hash=recipe_hash,
                created=time.time(), format=format or "",
            )

        if not self.local:
            return self._register_remote(name, src, entry_for, move)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root / name))
        if move:
            shutil.move(str(src), tmp / "files")
        else:
            shutil.copytree(src, tmp / "files")
        for _ in range(100):  # another writer may take the same version: retry with the next one
            entry = entry_for((self.versions(name) or [0])[-1] + 1)
            (tmp / "entry.json").write_text(json.dumps(asdict(entry), indent=2, sort_keys=True))
            try:
                os.rename(tmp, Path(entry.path).parent)
                return entry
            except OSError:
                continue
        raise ConfigError(f"could not allocate a version for '{name}' in {self.uri}")

    def _register_remote(self, name: str, src: Path, entry_for, move: bool) -> Entry:
        """Upload ``src`` as the next version of ``name``; ``entry.json`` last, so readers never see half of it."""
        entry = entry_for((self.versions(name) or [0])[-1] + 1)
        target = self._remote(name, entry.version)
        if self.fs.exists(target):
            raise ConfigError(f"'{name}@{entry.version}' is being written by another process in {self.uri}; retry")
        try:
            self.fs.put(str(src) + "/", target + "/files", recursive=True)
            self.fs.pipe_file(target + "/entry.json", json.dumps(asdict(entry), indent=2, sort_keys=True).encode())
        except BaseException:
            self.fs.rm(target, recursive=True)
            raise
        # This node has the files already: keep them as the cached copy.
        local = Path(entry.path)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(local, ignore_errors=True)
        (shutil.move if move else shutil.copytree)(str(src), str(local))
        (local.parent / ".complete").touch()
        return entry

    def resolve_source(self, source: str) -> str:
        """Turn a model source (registry ref, local path or hub id) into what an engine loads."""
        p = Path(source).expanduser()
        if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
            return str(p.resolve())
        if source.startswith(("/", "./", "~")):
            raise ModelNotFound(f"model path {source} does not exist. Fix: build or copy the model there first")
        name, _, _ = parse_ref(source) if _REF_RE.match(source) else (source, None, None)
        if "/" not in source and self.versions(name):
            return self.get(source).path
        if "/" in source:  # a hub id such as "meta-llama/Llama-3.1-8B-Instruct": the engine downloads it
            return source
        known = ", ".join(e.ref for e in self.list()) or "none"
        raise ModelNotFound(
            f"model '{source}' is neither a directory nor a registry entry (registry {self.uri}: {known}). "
            "Fix: run `homefire models build` for the demo models, or give a path or hub id"
        )
