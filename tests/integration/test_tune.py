"""`homefire tune` end to end, as a user runs it: a real Ray Tune sweep over GGUF and ONNX variants of the tiny
model and a chain (structured pruning, distillation from the original on Ray Train, then GGUF), each measured on its
own engine, the driver SIGKILLed after its first trial and resumed with `--resume`, then the report, the Pareto plot,
and the winner served from the emitted config through the official client, answering what the sweep measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration

QUANTIZE = ["gguf-q8_0", "onnx-int8"]
CHAIN = "prune-mlp-25+distill+gguf-q8_0"
VARIANTS = [*QUANTIZE, CHAIN]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "homefire.cli", "tune", *args]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_path):
    """The sweep, killed after its first finished trial and resumed; returns (experiment dir, report, outputs)."""
    root = tmp_path_factory.mktemp("tune")
    cfg = root / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny-sweep", "model": {"source": "demo-tiny"}, "space": {"quantize": QUANTIZE, "chains": [CHAIN],
                  "distill": {"steps": 3, "batch_size": 4, "max_length": 64}},
        "eval": {"max_tokens": 256, "window": 128},
        "speed": {"concurrency": [1, 2], "prompts": 2, "input_len": 16, "output_len": 8},
        # demo-tiny has random weights: the bound is loose; the demo config uses 0.02 on the pretrained model
        "select": {"max_ppl_increase": 0.05, "concurrency": 1},
        "storage_path": str(root / "runs"),
    }))
    first = subprocess.Popen(_cli(str(cfg)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    seen: list[str] = []
    deadline = time.monotonic() + 600
    try:
        for line in first.stdout:
            seen.append(line)
            if " done / " in line:
                break
            assert time.monotonic() < deadline, "".join(seen[-30:])
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-sweep
        first.wait(30)
    assert any(" done / " in line for line in seen), "".join(seen[-30:])
    experiment = root / "runs" / "tiny-sweep"
    assert experiment.is_dir() and not (experiment / "report.json").exists()
    second = subprocess.run(_cli(str(cfg), "--resume", str(experiment)), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    report = json.loads((experiment / "report.json").read_text())
    return experiment, report, "".join(seen), second.stdout


def test_every_variant_is_measured_on_its_engine(sweep):
    _, report, _, _ = sweep
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"original", *VARIANTS}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["original"]["engine"] == "transformers"
    assert rows["gguf-q8_0"]["engine"] == "llamacpp" and rows["onnx-int8"]["engine"] == "onnx"
    for r in rows.values():
        assert r["perplexity"] > 1 and r["size_bytes"] > 0 and r["peak_memory_bytes"] > 0
        assert r["c1_output_tok_s"] > 0 and r["c2_output_tok_s"] > 0 and r["c1_p50_ttft_ms"] > 0
        assert r["scored_tokens"] == rows["original"]["scored_tokens"]  # the same windows of the same text
        assert r["kl_to_original"] >= 0 and 0 < r["top1_agreement"] <= 1
        assert r["task_n"] == 128 and 0 <= r["task_score"] <= 1  # the shipped cloze task, on the variant's engine
    assert (rows["original"]["kl_to_original"], rows["original"]["top1_agreement"]) == (0, 1)
    # 8-bit formats stay close to the original (measured ~0.1 %): a broken conversion would not
    assert abs(rows["gguf-q8_0"]["ppl_increase"]) < 0.02 and abs(rows["onnx-int8"]["ppl_increase"]) < 0.02
    # a quarter of the MLP gone moves the distribution more than 8-bit weights do
    assert rows[CHAIN]["kl_to_original"] > rows["gguf-q8_0"]["kl_to_original"]


def test_the_chain_prunes_distills_then_quantizes(sweep):
    from homefire.registry import Registry

    _, report, _, _ = sweep
    row = next(r for r in report["rows"] if r["variant"] == CHAIN)
    assert row["engine"] == "llamacpp" and row["distill_steps"] == 3 and row["size_bytes"] < next(
        r["size_bytes"] for r in report["rows"] if r["variant"] == "gguf-q8_0")
    reg = Registry()
    quantized = reg.get(row["entry"])
    distilled = reg.get(quantized.parent)
    pruned = reg.get(distilled.parent)
    assert distilled.config["lineage"]["method"] == "distill" and distilled.config["lineage"]["teacher"] == "demo-tiny"
    assert pruned.config["recipe"]["to"] == "prune-mlp-25" and pruned.config["recipe"]["shape"]["after"]["intermediate"] < \
        pruned.config["recipe"]["shape"]["before"]["intermediate"]


def test_progress_lines_and_resume(sweep):
    _, _, first, second = sweep
    assert "original" in first and "ppl" in first and "tok/s" in first
    assert "done / " in second and "failed" in second  # the live count


def test_report_plot_and_the_winner(sweep):
    experiment, report, _, _ = sweep
    assert report["best"] in VARIANTS and set(report["best_by_concurrency"]) == {"1", "2"}
    best = next(r for r in report["rows"] if r["variant"] == report["best"])
    others = [r for r in report["rows"] if r["variant"] in VARIANTS and r["status"] == "ok"]
    assert best["c1_output_tok_s"] == max(r["c1_output_tok_s"] for r in others if r["ppl_increase"] <= 0.05)
    md = (experiment / "report.md").read_text()
    assert "| original | transformers | ok |" in md and f"**Best for 1 stream(s): {report['best']}**" in md
    assert (experiment / "pareto.png").stat().st_size > 10_000


def test_the_winner_serves_what_the_sweep_measured(sweep):
    from openai import OpenAI

    from homefire.tune.trial import GREEDY_PROMPT, GREEDY_TOKENS

    experiment, report, _, _ = sweep
    text = (experiment / "serve.yaml").read_text()
    assert text.startswith("# Written by `homefire tune`") and "homefire serve" in text
    args = yaml.safe_load(text)["applications"][0]["args"]
    (model,) = args["models"]
    assert model["name"] == "demo-tiny"
    best = next(r for r in report["rows"] if r["variant"] == report["best"])
    assert model["source"] == best["entry"] and model["engine"] == best["engine"]
    cluster = ServeCluster(num_cpus=4)
    try:
        cluster.deploy(args)
        client = OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.completions.create(model="demo-tiny", prompt=GREEDY_PROMPT, max_tokens=GREEDY_TOKENS,
                                        temperature=0)
        assert out.choices[0].text == best["greedy_sample"]
    finally:
        cluster.close()


def test_optuna_search_with_asha_measures_the_original_then_its_picks(tmp_path):
    """search: optuna: the original first (the reference), then Optuna's multi-objective picks from the space;
    scheduler: asha measures every pick's quality first and the speed only of those it keeps."""
    cfg = tmp_path / "optuna.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny-optuna", "model": {"source": "demo-tiny"}, "search": "optuna", "num_samples": 2,
        "scheduler": "asha",
        "space": {"quantize": ["gguf-q8_0", "gguf-q4_0"], "prune_range": {"method": "wanda", "max": 50, "step": 25}},
        "eval": {"max_tokens": 128, "window": 64, "task": None},  # the task score is the sweep above's
        "speed": {"concurrency": [1], "prompts": 1, "input_len": 8, "output_len": 4},
        "select": {"max_ppl_increase": 0.5, "concurrency": 1}, "storage_path": str(tmp_path / "runs"),
    }))
    out = subprocess.run(_cli(str(cfg)), capture_output=True, text=True, timeout=900)
    # exit 1 is "no winner" (Optuna may pick only sparse, quality-only variants): the sweep itself must have run
    assert out.returncode == 0 or (out.returncode == 1 and "no winner" in out.stdout), out.stdout[-4000:] + out.stderr[-4000:]
    assert "chosen by Optuna" in out.stdout and "of 3]" in out.stdout and "(quality rung: speed next" in out.stdout
    report = json.loads((tmp_path / "runs" / "tiny-optuna" / "report.json").read_text())
    variants = [r["variant"] for r in report["rows"]]
    assert variants[0] == "original" and 2 <= len(variants) <= 3  # a point Optuna picks twice is one row
    assert report["rows"][0]["status"] == "ok"
    for r in report["rows"][1:]:  # measured through, or stopped by ASHA after its quality (perplexity kept)
        assert r["status"] == "ok" or (r["status"] == "stopped" and r["perplexity"] > 1), r
    assert all(v == "original" or v.endswith(("gguf-q8_0", "gguf-q4_0")) or v.startswith("prune-wanda-")
               for v in variants)
