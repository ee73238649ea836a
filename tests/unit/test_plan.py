"""The capacity planner (`homefire plan`): its arithmetic against hand-computed values, its TP choice, its errors, and
what the command prints. vLLM's own start-up figures are checked in tests/integration/test_plan_vllm.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from homefire.cli import main
from homefire.errors import ConfigError, ModelNotFound
from homefire.registry import Registry
from homefire.serve.config import AppConfig, VLLMModelConfig
from homefire.serve.plan import (
    GIB, Assumptions, Workload, engine_settings, kv_bytes_per_token, kv_capacity, plan_app,
)
from homefire.serve.specs import ModelShape, load_gpus, pick_gpus, resolve_shape, shape_from_dir

ROOT = Path(__file__).resolve().parents[2]
GPUS = load_gpus().gpus


def shape(hub_id: str) -> ModelShape:
    return resolve_shape(hub_id, Registry())


def plan_one(model: dict, gpus: list[str], workload: Workload | None = None):
    cfg = AppConfig.model_validate({"models": [{"name": "m", **model}]})
    return plan_app(cfg, pick_gpus(load_gpus(), gpus), workload or Workload())[0]


# ------------------------------------------------------------------ shapes and the arithmetic, by hand
def test_llama_8b_parameters_weights_and_kv_bytes_per_token():
    s = shape("meta-llama/Llama-3.1-8B-Instruct")
    assert "shipped table" in s.origin
    attn = 4096 * 4096 * 2 + 4096 * 1024 * 2          # q, o; k, v (8 KV heads x 128)
    layer = attn + 3 * 4096 * 14336 + 2 * 4096        # + gated MLP + two norms
    assert s.params() == 32 * layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248
    assert s.weight_bytes(2) == 16_060_522_496
    assert kv_bytes_per_token(s, 2) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_token(s, 2, tp=2) == 65_536      # KV heads split across TP
    assert kv_bytes_per_token(s, 2, tp=8) == 16_384      # one KV head per GPU
    assert kv_bytes_per_token(s, 1) == 65_536            # an fp8 KV cache


def test_other_shipped_shapes_match_their_published_parameter_counts():
    assert shape("meta-llama/Llama-3.1-70B").params() == 70_553_706_496
    qwen = shape("Qwen/Qwen2.5-7B-Instruct")  # q/k/v carry biases
    assert qwen.params() == 7_615_616_512 and qwen.max_position_embeddings == 32768
    assert shape("Qwen/Qwen2.5-7B").max_position_embeddings == 131072
    mixtral = shape("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert mixtral.params() == 46_702_792_704
    assert mixtral.active_params() == 46_702_792_704 - 32 * 6 * 3 * 4096 * 14336 == 12_879_925_248
    assert shape("mistralai/Mistral-7B-v0.3").params() == 7_248_023_552


def test_kv_capacity_is_vllms_block_arithmetic():
    s = shape("meta-llama/Llama-3.1-8B")
    settings = engine_settings(VLLMModelConfig(name="m", source="x", max_model_len=1000), s, on_gpu=True)
    assert settings.block_size == 16 and settings.dtype == "bfloat16"
    blocks, tokens, conc = kv_capacity(10 * GIB, s, settings)
    assert blocks == 10 * GIB // (16 * 131_072) == 5120
    assert conc == 5120 / 63          # a 1000-token request takes ceil(1000 / 16) = 63 blocks
    assert tokens == int(5120 / 63 * 1000) == 81_269


def test_llama_8b_on_one_h100_by_hand():
    w = Workload(input_tokens=2000, output_tokens=300, rps=5)
    p = plan_one({"source": "meta-llama/Llama-3.1-8B-Instruct", "gpus": 1, "max_model_len": 8192}, ["h100"], w)
    (row,) = p.rows
    assert (row.target, row.tp, row.fits, row.memory_share) == ("h100", 1, True, 0.9)
    weights = 8_030_261_248 * 2
    overhead = GIB + 2048 * (4 * 4096 + 3 * 14336) * 2 + 128 * 128256 * 4  # fixed + activations + fp32 logits
    space = 79.6 * GIB * 0.9 - weights - overhead
    assert row.kv_space_gib_per_gpu == pytest.approx(space / GIB)
    assert row.kv_blocks == int(space) // (16 * 131_072)
    assert row.kv_tokens == int(row.kv_blocks / 512 * 8192)               # 8192 / 16 = 512 blocks per request
    assert row.workload_seqs == row.kv_blocks // math.ceil(2300 / 16)
    assert row.batch == min(row.workload_seqs, 128)
    # Decode at one stream: weights + its KV cache at the mean context (2150 tokens), at 0.7 of 3350 GB/s.
    one = 1 / ((weights + 2150 * 131_072) / (3350e9 * 0.7))
    assert row.decode_tps_one == pytest.approx(one)
    # Prefill of 2000 tokens: 2 x params x n + causal attention 2 x layers x n^2 x 4096, at 0.5 of 989 TFLOPs.
    flops = 2 * 8_030_261_248 * 2000 + 2 * 32 * 2000 ** 2 * 4096
    assert row.prefill_tps == pytest.approx(2000 / (flops / (989e12 * 0.5)))
    per_request = 2000 / row.prefill_tps + 300 / row.decode_tps_batch
    assert row.replicas == math.ceil(5 * per_request) and row.usd_per_hour == pytest.approx(row.replicas * 2.99)
    assert row.usd_per_m_output == pytest.approx(row.usd_per_hour / (5 * 300 * 3600) * 1e6)


def test_70b_smallest_tp_that_fits_per_gpu_type():
    m = {"source": "meta-llama/Llama-3.1-70B-Instruct", "gpus": 4, "max_model_len": 8192}
    rows = plan_one(m, ["h100", "a100-40gb", "l4"]).rows
    smallest = {r.target: r.tp for r in rows if r.role == "smallest TP"}
    assert smallest == {"h100": 2, "a100-40gb": 4, "l4": 8}
    assert all(r.fits for r in rows)
    assert [r.tp for r in rows if r.role == "gpus: 4"] == [4]   # the config's 4 GPUs on h100, shown beside TP 2
    # At the model's own 128k context, one full-length request must fit: TP 2 on H100 no longer does.
    long = plan_one({**m, "max_model_len": None}, ["h100"]).rows
    assert long[0].tp == 4 and long[0].max_concurrency >= 1


def test_a_model_too_big_for_eight_gpus_says_so_and_the_fix():
    (row,) = plan_one({"source": "meta-llama/Llama-3.1-70B", "gpus": 8, "max_model_len": 131072}, ["l4"]).rows
    assert not row.fits and row.tp == 8 and row.role == "does not fit"
    assert "does not fit on 8 x l4" in row.note and "Fix" in row.note and row.replicas is None


def test_a_fractional_gpu_plans_its_share_and_falls_back_to_whole_gpus():
    m = {"source": "meta-llama/Llama-3.1-8B-Instruct", "gpus": 0.5, "max_model_len": 8192}
    (h100,) = plan_one(m, ["h100"]).rows
    assert h100.memory_share == 0.45 and h100.role == "gpus: 0.5"
    assert h100.usd_per_hour == pytest.approx(h100.replicas * 0.5 * 2.99)  # half a GPU per replica
    l4 = plan_one(m, ["l4"]).rows
    assert l4[0].memory_share == 0.9 and "does not fit in gpus: 0.5" in l4[0].note


def test_moe_reads_only_the_experts_a_small_batch_uses():
    mix = plan_one({"source": "mistralai/Mixtral-8x7B-v0.1", "gpus": 2, "max_model_len": 8192}, ["h100"]).rows[0]
    assert mix.tp == 2
    # One stream touches 2 of 8 experts per layer: it reads far less than all 87 GiB of weights per step.
    all_weights_s = mix.weights_gib_per_gpu * GIB / (3350e9 * 0.7) / 0.9
    assert mix.decode_tps_one > 2 / all_weights_s


def test_cpu_model_kv_cache_is_kv_cache_gb_in_whole_gib(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    p = plan_one({"source": "demo-tiny", "max_model_len": 512}, [])
    (row,) = p.rows
    assert p.settings["dtype"] == "float32" and p.settings["block_size"] == 128
    assert p.kv_bytes_per_token == 2 * 2 * 2 * 64 * 4 == 2048
    assert (row.target, row.kv_space_gib_per_gpu, row.kv_tokens, row.max_concurrency) == ("cpu", 1, 524_288, 1024)
    assert plan_one({"source": "demo-tiny", "max_model_len": 512, "kv_cache_gb": 2.5}, []).rows[0].kv_tokens == (
        2 * 524_288)  # vLLM reads VLLM_CPU_KVCACHE_SPACE as whole GiB
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")   # set where the replica starts, it wins (as in the engine)
    assert plan_one({"source": "demo-tiny", "max_model_len": 512}, []).rows[0].kv_tokens == 3 * 524_288


def test_a_workload_longer_than_the_context_is_flagged():
    p = plan_one({"source": "demo-tiny", "max_model_len": 512}, [], Workload(input_tokens=2000, output_tokens=300))
    assert p.rows[0].workload_seqs == 0
    assert any("longer than max_model_len 512" in n and "Fix" in n for n in p.notes)


def test_other_engines_are_listed_as_skipped():
    cfg = AppConfig.model_validate({"models": [{"name": "q8", "source": "x.gguf", "engine": "llamacpp"}]})
    (p,) = plan_app(cfg, {}, Workload())
    assert p.skipped and "llamacpp" in p.skipped and not p.rows


# ------------------------------------------------------------------ where shapes come from
def test_shape_from_a_local_dir_counts_safetensors_parameters(tiny_model_path):
    s = shape_from_dir(tiny_model_path)
    assert "safetensors" in s.origin and s.float_params == s.formula_params() > 0
    assert s.weight_bytes(4) == s.float_params * 4


def test_hub_id_from_the_hf_cache_beats_the_table(tmp_path, monkeypatch):
    snap = tmp_path / "models--meta-llama--Llama-3.1-8B" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    (snap / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 256, "torch_dtype": "float16"}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    s = shape("meta-llama/Llama-3.1-8B")
    assert "Hugging Face cache" in s.origin and s.hidden_size == 64 and s.head_dim == 16


def test_unknown_hub_id_offline_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound) as e:
        shape("acme/secret-model-13b")
    assert "not on this machine" in str(e.value) and "local directory" in str(e.value)
    assert "meta-llama/Llama-3.1-8B" in str(e.value)  # the table's names


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("text, says", [
    ("in=abc", "--workload in='abc'"), ("out=2.5", "--workload out='2.5'"), ("rps=0", "--workload rps='0'"),
    ("foo=1", "unknown field 'foo'"), ("in2000", "is not FIELD=VALUE"), ("in=", "is not FIELD=VALUE"),
])
def test_malformed_workload_names_the_field_and_the_fix(text, says):
    with pytest.raises(ConfigError) as e:
        Workload.parse(text)
    assert says in str(e.value) and "Fix: " in str(e.value) and "in=2000,out=300,rps=5" in str(e.value)


def test_workload_parses_a_subset():
    assert Workload.parse("in=100,rps=2.5") == Workload(input_tokens=100, output_tokens=300, rps=2.5)


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        pick_gpus(load_gpus(), ["h100", "tpu-v5"])
    assert "unknown GPU 'tpu-v5'" in str(e.value) and "h100, h100-pcie" in str(e.value) and "--prices" in str(e.value)


def test_prices_file_overrides_and_adds_gpus(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("prices_date: 2026-11\ngpus:\n  H100: {usd_per_hour: 1.5}\n"
                 "  mi300x: {memory_gib: 191.5, bandwidth_gbs: 5300, bf16_tflops: 1307, usd_per_hour: 3.0}\n")
    t = load_gpus(f)
    assert t.gpus["h100"].usd_per_hour == 1.5 and t.gpus["h100"].bandwidth_gbs == 3350 and t.prices_date == "2026-11"
    assert t.gpus["mi300x"].memory_gib == 191.5
    f.write_text("gpus:\n  mi300x: {memory_gib: 191.5, usd_per_hour: 3.0}\n")
    with pytest.raises(ConfigError) as e:
        load_gpus(f)
    assert "gpus.mi300x.bandwidth_gbs: required key is missing" in str(e.value)


# ------------------------------------------------------------------ the command
def test_cli_plan_prints_a_table_per_model_and_the_assumptions(capsys):
    assert main(["plan", str(ROOT / "serve/configs/llama-70b-tp.yaml"), "--gpu", "h100", "--gpu", "l4",
                 "--workload", "in=2000,out=300,rps=5"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-70b: meta-llama/Llama-3.1-70B-Instruct (shape: shipped table" in out
    assert "KV cache 327,680 B/token = 2 x 80 layers x 8 KV heads x 128 x 2 B" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("  h100 ", "  l4 ")) and ln.split()[1].isdigit()]
    assert [(r[0], r[1], " ".join(r[17:])) for r in rows] == [
        ("h100", "2", "smallest TP"), ("h100", "4", "tensor_parallel: 4"), ("l4", "8", "smallest TP")]
    assert "l4 TP 8: at the config's tensor_parallel: 4 (TP 4) it does not fit" in out
    assert "estimates, not measurements" in out and "0.70" in out and "2025-06" in out


def test_cli_plan_json(capsys):
    assert main(["plan", str(ROOT / "serve/configs/gpu-fractional.yaml"), "--gpu", "h100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload"] == {"in": 2000, "out": 300, "rps": 5.0} and data["assumptions"] == {
        **Assumptions().__dict__}
    llama = data["models"][0]
    assert llama["name"] == "llama-3.1-8b" and llama["kv_bytes_per_token"] == 131_072
    assert llama["rows"][0]["memory_share"] == 0.45 and llama["rows"][0]["usd_per_hour"] > 0


def test_cli_plan_errors_exit_2_with_the_fix(capsys):
    assert main(["plan", str(ROOT / "serve/configs/llama-70b-tp.yaml"), "--gpu", "v100"]) == 2
    assert "unknown GPU 'v100'" in capsys.readouterr().err
    assert main(["plan", str(ROOT / "serve/configs/llama-70b-tp.yaml"), "--workload", "in=lots"]) == 2
    assert "--workload in='lots'" in capsys.readouterr().err


def test_plan_imports_nothing_heavy():
    code = ("import sys\nfrom homefire.cli import main\nmain(['plan', %r, '--gpu', 'l4'])\n"
            "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            % str(ROOT / "serve/configs/llama-70b-tp.yaml"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "smallest TP" in out.stdout
