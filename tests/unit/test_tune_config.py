"""`homefire tune` configs: the shipped ones load; bad keys, formats and impossible combinations are refused when
the config loads, naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from homefire.convert import compressed
from homefire.errors import ConfigError
from homefire.tune.config import HELDOUT_TEXT, load_tune_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "tune" / "configs").glob("*.yaml"))


def _write(tmp_path, data) -> Path:
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base(**kw):
    return {"model": {"source": "demo"}, "space": {"quantize": ["gguf-q8_0"]}, **kw}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_tune_configs_load_and_say_how_to_run_them(path, monkeypatch):
    monkeypatch.setattr(compressed, "cpu_flags", lambda: {"avx512f"})
    assert path.read_text().startswith("#") and "homefire tune" in path.read_text().split("\n\n")[0]
    cfg = load_tune_config(path)
    assert cfg.space.quantize and cfg.select.concurrency in cfg.speed.concurrency


def test_the_heldout_text_ships():
    assert len(HELDOUT_TEXT.read_text().split()) > 300


@pytest.mark.parametrize("data, expected", [
    (_base(space={"quantize": ["gguf-q9"]}), "space.quantize: unknown format(s) gguf-q9; fix: use any of"),
    (_base(space={"quantize": []}), "space.quantize"),
    (_base(space={"quantize": ["onnx-int4", "onnx-int4"]}), "listed twice"),
    (_base(selct={"max_ppl_increase": 0.1}), "selct: unknown key"),
    (_base(select={"concurrency": 4}), "select.concurrency 4 is not measured; fix: add it to speed.concurrency"),
    (_base(select={"max_ppl_increase": -1}), "select.max_ppl_increase"),
    (_base(eval={"text": "/no/such/file.txt"}), "eval.text /no/such/file.txt is not a file"),
    ({"space": {"quantize": ["gguf-q8_0"]}}, "model"),
])
def test_bad_configs_name_the_key(tmp_path, data, expected):
    with pytest.raises(ConfigError) as e:
        load_tune_config(_write(tmp_path, data))
    assert expected in str(e.value)


def test_w4a16_without_avx512_is_refused_when_the_config_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(compressed, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(compressed, "_has_cuda", lambda: False)
    with pytest.raises(ConfigError) as e:
        load_tune_config(_write(tmp_path, _base(space={"quantize": ["gguf-q8_0", "vllm-w4a16"]})))
    assert "space.quantize: vllm-w4a16 needs AVX-512 (avx512f)" in str(e.value) and "fix:" in str(e.value)


def test_overrides_use_dotted_keys(tmp_path):
    cfg = load_tune_config(_write(tmp_path, _base()), {"select.max_ppl_increase": 0.05, "speed.concurrency": [1, 4]})
    assert cfg.select.max_ppl_increase == 0.05 and cfg.speed.concurrency == [1, 4]
