from __future__ import annotations

import json

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
