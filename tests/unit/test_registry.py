from __future__ import annotations

import json
from pathlib import Path

import pytest

from homefire.errors import ConfigError, ModelNotFound
from homefire.registry import Registry, parse_ref, sha256_file


def _artifact(tmp_path, text="weights"):
    d = tmp_path / "art"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_text(text)
    (d / "config.json").write_text(json.dumps({"a": 1}))
    return d


def test_register_versions_and_hashes(tmp_path):
    reg = Registry(tmp_path / "reg")
    e1 = reg.register("demo", _artifact(tmp_path, "v1"), metrics={"ppl": 3.0})
    e2 = reg.register("demo", _artifact(tmp_path, "v2"), parent=e1.ref)
    assert (e1.version, e2.version) == (1, 2)
    assert reg.get("demo").version == 2 and reg.get("demo@1").metrics == {"ppl": 3.0}
    assert e2.parent == "demo@1"
    f = tmp_path / "reg" / "demo" / "1" / "files" / "model.safetensors"
    assert e1.files["model.safetensors"] == sha256_file(f)
    assert [e.ref for e in reg.list()] == ["demo@1", "demo@2"]


def test_resolve_source(tmp_path):
    reg = Registry(tmp_path / "reg")
    e = reg.register("demo", _artifact(tmp_path))
    assert reg.resolve_source("demo") == e.path
    assert reg.resolve_source(str(tmp_path / "art")) == str((tmp_path / "art").resolve())
    assert reg.resolve_source("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(ModelNotFound, match="demo@1"):
        reg.resolve_source("nope")
    with pytest.raises(ModelNotFound, match="does not exist"):
        reg.resolve_source("/no/such/dir")


def test_refs_and_names_are_validated(tmp_path):
    assert parse_ref("demo@3:sql") == ("demo", 3, "sql")
    with pytest.raises(ConfigError):
        parse_ref("a@b@c")
    with pytest.raises(ConfigError):
        Registry(tmp_path).register("bad name!", _artifact(tmp_path))
    with pytest.raises(ModelNotFound, match="entries: none"):
        Registry(tmp_path / "empty").get("x@2")


def test_adapters_are_looked_up_under_their_base(tmp_path):
    reg = Registry(tmp_path / "reg")
    demo1 = reg.register("demo", _artifact(tmp_path, "d1"))
    demo2 = reg.register("demo", _artifact(tmp_path, "d2"))
    other = reg.register("other", _artifact(tmp_path, "o1"))
    on1 = reg.register("sql", _artifact(tmp_path, "a1"), kind="adapter", parent=demo1.ref)
    on_other = reg.register("sql", _artifact(tmp_path, "a2"), kind="adapter", parent=other.ref)
    on2 = reg.register("sql", _artifact(tmp_path, "a3"), kind="adapter", parent=demo2.ref)
    assert reg.get("demo@1:sql") == on1  # the base's version is the base's, not the adapter's
    assert reg.get("demo:sql") == on2 and reg.get("demo@2:sql") == on2
    assert reg.get("other:sql") == on_other
    with pytest.raises(ModelNotFound, match="it exists for demo@1, demo@2, other@1"):
        reg.get("demo@3:sql")
    with pytest.raises(ModelNotFound, match="no adapter of that name"):
        reg.get("demo:nope")
    with pytest.raises(ConfigError):
        reg.adapter_versions("../demo")
    assert [e.ref for e in reg.adapter_versions("sql")] == ["sql@3", "sql@2", "sql@1"]


def test_a_moved_registry_still_finds_its_files(tmp_path):
    """Entry paths are where this node sees the files: a shared mount may sit elsewhere on another node."""
    reg = Registry(tmp_path / "a")
    reg.register("demo", _artifact(tmp_path))
    (tmp_path / "a").rename(tmp_path / "b")
    moved = Registry(tmp_path / "b").get("demo")
    assert moved.path == str(tmp_path / "b" / "demo" / "1" / "files")
    assert (Path(moved.path) / "model.safetensors").read_text() == "weights"


def test_file_uri_is_the_local_registry(tmp_path):
    reg = Registry(f"file://{tmp_path / 'reg'}")
    assert reg.local and reg.root == tmp_path / "reg"
    e = reg.register("demo", _artifact(tmp_path))
    assert Registry(tmp_path / "reg").get("demo") == e
    assert reg.resolve_source("demo@1") == e.path


@pytest.fixture
def memory_registry(tmp_path, monkeypatch):
    """A remote registry (fsspec's in-memory filesystem), its local cache under tmp_path."""
    import fsspec

    from homefire import constants

    monkeypatch.setattr(constants, "HOME_DIR", tmp_path / "home")
    uri = f"memory://homefire-test-{tmp_path.name}/registry"
    yield Registry(uri)
    fsspec.filesystem("memory").rm(uri.removeprefix("memory://").split("/")[0], recursive=True)


def test_remote_registry_registers_fetches_and_checks_hashes(memory_registry, tmp_path, monkeypatch):
    from homefire import constants

    reg = memory_registry
    assert not reg.local and reg.list() == []
    e1 = reg.register("demo", _artifact(tmp_path, "v1"), metrics={"ppl": 3.0})
    e2 = reg.register("demo", _artifact(tmp_path, "v2"), parent=e1.ref)
    adapter = reg.register("sql", _artifact(tmp_path, "a"), kind="adapter", parent=e2.ref)
    assert [e.ref for e in reg.list()] == ["demo@1", "demo@2", "sql@1"]
    assert reg.fs.cat_file(f"{reg._base}/demo/1/files/model.safetensors") == b"v1"
    # another node: same URI, empty cache -> files are downloaded on first get
    monkeypatch.setattr(constants, "HOME_DIR", tmp_path / "node2")
    node2 = Registry(reg.uri)
    assert node2.root != reg.root
    lazy = node2.get("demo@1", fetch=False)
    assert not Path(lazy.path).exists()
    got = node2.get("demo@1")
    assert (Path(got.path) / "model.safetensors").read_text() == "v1" and got.metrics == {"ppl": 3.0}
    assert node2.get("demo:sql").ref == adapter.ref and node2.resolve_source("demo") == node2.get("demo@2").path
    # a file altered in the store is refused, not served
    reg.fs.pipe_file(f"{reg._base}/demo/2/files/model.safetensors", b"tampered")
    monkeypatch.setattr(constants, "HOME_DIR", tmp_path / "node3")
    with pytest.raises(ConfigError, match="sha256"):
        Registry(reg.uri).get("demo@2")


def test_remote_registry_failed_upload_leaves_nothing(memory_registry, tmp_path, monkeypatch):
    reg = memory_registry
    reg.register("demo", _artifact(tmp_path))

    def broken_pipe(*args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(reg.fs, "pipe_file", broken_pipe)
    with pytest.raises(OSError):
        reg.register("demo", _artifact(tmp_path, "v2"))
    assert reg.versions("demo") == [1] and not reg.fs.exists(f"{reg._base}/demo/2")


def test_a_missing_converted_variant_names_the_convert_command(tmp_path):
    from homefire.models.build import resolve_source

    with pytest.raises(ModelNotFound, match="Fix: homefire models convert demo --to gguf-q8_0"):
        resolve_source("demo-gguf-q8_0", Registry(tmp_path / "reg"))
