"""Training for real: Ray Train workers (gloo on CPU), PEFT LoRA, checkpoints, a killed worker, resume, registry.

One local Ray for the module; every run trains the ~0.8M-param offline model on the shipped fixed-answer task.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from homefire.config import validate_config
from homefire.registry import Registry, sha256_file
from homefire.train import TrainConfig, run_training

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "train" / "data" / "homefire-answer.jsonl"
ANSWER = "Homefire keeps your models at home."


@pytest.fixture(scope="module")
def ray_cluster(tiny_model_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    os.environ["HOMEFIRE_TEST_DASHBOARD"] = "http://" + ctx.dashboard_url
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def big_data(tmp_path_factory) -> Path:
    """The shipped rows repeated: long enough epochs that a worker can be killed mid-epoch."""
    path = tmp_path_factory.mktemp("data") / "answer-x8.jsonl"
    path.write_text(DATA.read_text() * 8)
    return path


def _cfg(storage: Path, name: str, data: Path = DATA, **over) -> TrainConfig:
    cfg = {
        "model": {"source": "demo-tiny"},
        "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.1},
        "optim": {"lr": 1e-2, "batch_size": 8, "max_steps": 30, "scheduler": "linear", "warmup_steps": 0},
        "scaling": {"workers": 2},
        "checkpoint": {"every_n_steps": 10, "keep": 2},
        "output": {"name": name},
        "storage_path": str(storage),
        "log_every_n_steps": 1,
    }
    for key, value in over.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate_config(TrainConfig, cfg, "test")


def test_lora_run_learns_the_task_reports_and_registers_with_lineage(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, "answer-a", **{"eval.exact_match": {"samples": 8, "max_new_tokens": 24}})
    report = run_training(cfg)

    assert report.status == "finished" and report.steps == 30 and report.workers == 2
    assert report.eval_after["eval_loss"] < 0.5 * report.eval_before["eval_loss"]
    assert report.exact_match["before"] == 0.0 and report.exact_match["after"] >= 0.75, report.exact_match
    assert 0 < report.trainable_params < 0.1 * report.total_params
    run_dir = Path(report.run_dir)
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["final_loss"] == report.final_loss and len(saved["history"]) == 30
    assert (run_dir / "loss_curve.png").stat().st_size > 10_000
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 30
    assert sorted(p.name for p in run_dir.glob("checkpoint_step_*")) == [
        "checkpoint_step_000010", "checkpoint_step_000020", "checkpoint_step_000030_final"]

    assert report.entry == "demo-tiny:answer-a"
    entry = Registry().get("answer-a")
    assert entry.kind == "adapter" and entry.parent.startswith("demo-tiny@")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(entry.files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in entry.files)
    lineage = entry.config["lineage"]
    assert lineage["run_id"] == report.run_id and lineage["base"] == entry.parent and lineage["base_hash"]
    assert lineage["data_hash"] == report.data["data_hash"] and len(lineage["data_hash"]) == 64
    assert entry.metrics["exact_match"]["after"] == report.exact_match["after"]
    assert entry.config["train_config"]["lora"]["r"] == 8


def _workers(address: str) -> list[int]:
    from ray.util.state import list_actors

    alive = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in alive]


def _wait_for_step(run_root: Path, step: int, timeout_s: float = 240) -> Path:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for log in run_root.glob("*/metrics.jsonl"):
            lines = log.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return log.parent
        time.sleep(0.02)
    raise AssertionError(f"no run under {run_root} reached step {step} in {timeout_s}s")


def test_merged_model_is_registered_as_a_full_model_that_answers_like_the_adapter(ray_cluster, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = run_training(_cfg(tmp_path, "answer-merged", **{"output.merge": True}))
    assert report.entry.startswith("answer-merged@")
    entry = Registry().get(report.entry)
    assert entry.kind == "base" and entry.config["merged"] and entry.parent.startswith("demo-tiny@")
    assert "model.safetensors" in entry.files and "tokenizer.json" in entry.files
    assert not any("adapter" in f for f in entry.files)
    tok = AutoTokenizer.from_pretrained(entry.path)
    model = AutoModelForCausalLM.from_pretrained(entry.path)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Explain yield briefly."}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, len(ids):], skip_special_tokens=True) == ANSWER


def _registered_steps(run_dir: Path) -> list[int]:
    """Checkpoints Ray Train has registered (its snapshot in the run directory): what a restart resumes from."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [c["metrics"]["step"] for c in json.loads(snap.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def test_killed_worker_resumes_from_last_checkpoint_and_ends_like_an_uninterrupted_run(ray_cluster, tmp_path, big_data):
    over = {"optim.max_steps": 60, "checkpoint.every_n_steps": 10}  # an epoch is 144 steps: every kill is mid-epoch
    clean = run_training(_cfg(tmp_path / "clean", "answer-clean", big_data, **over))
    assert not clean.resumes

    out: dict = {}
    t = threading.Thread(target=lambda: out.update(report=run_training(_cfg(tmp_path / "killed", "answer-killed", big_data, **over))))
    t.start()
    run_dir = _wait_for_step(tmp_path / "killed", 1)
    deadline = time.time() + 240
    while not _registered_steps(run_dir) and time.time() < deadline:
        time.sleep(0.02)
    before = _registered_steps(run_dir)
    assert before and max(before) < 60, before
    pids = _workers(ray_cluster)
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    after = _registered_steps(run_dir)
    t.join(600)
    report = out["report"]

    assert report.status == "finished" and report.steps == 60
    assert len(report.resumes) == 1 and report.resumes[0]["from_step"] in {max(before), max(after)}, (report.resumes, before, after)
    resumed = report.resumes[0]["from_step"]
    steps_logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps_logged) == 60 and steps_logged.count(resumed + 1) == 2  # replayed after the kill
    assert report.final_loss == pytest.approx(clean.final_loss, rel=1e-4, abs=1e-5)
    assert report.eval_after["eval_loss"] == pytest.approx(clean.eval_after["eval_loss"], rel=1e-4, abs=1e-5)


def test_cli_resume_continues_a_stopped_run(ray_cluster, tmp_path, big_data):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(tmp_path / "runs", "answer-cli", big_data, **{"optim.max_steps": 30}).model_dump(mode="json")))
    cmd = [sys.executable, "-m", "homefire.cli", "train", str(cfg_path), "--address", ray_cluster]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        run_dir = _wait_for_step(tmp_path / "runs", 12)
        assert (run_dir / "checkpoint_step_000010").is_dir()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies: its Train controller and workers go with it
        proc.wait(60)
    assert not (run_dir / "report.json").exists()

    done = subprocess.run(cmd + ["--resume", run_dir.name], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run summary:" in done.stdout and "demo-tiny:answer-cli" in done.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 30 and report["resumes"][0]["from_step"] in (10, 20)
    assert report["status"] == "finished"


def test_ray_job_submit_runs_homefire_train_on_the_cluster(ray_cluster, tmp_path):
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(tmp_path / "runs", "answer-job", **{"optim.max_steps": 10}).model_dump(mode="json")))
    r = subprocess.run(
        ["ray", "job", "submit", "--address", os.environ["HOMEFIRE_TEST_DASHBOARD"], "--",
         sys.executable, "-m", "homefire.cli", "train", str(cfg_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout and "demo-tiny:answer-job" in r.stdout
    assert Registry().get("answer-job").kind == "adapter"


def test_bad_data_fails_before_any_worker_starts_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DATA.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"source": "demo-tiny"}, "data": {"train": str(bad)}, "output": {"name": "x"},
                                   "storage_path": str(tmp_path / "runs")}))
    started = time.time()
    r = subprocess.run([sys.executable, "-m", "homefire.cli", "train", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 2
    assert f"{bad}:2" in r.stderr and "last message must be the assistant" in r.stderr
    assert "Ray" not in r.stdout and not (tmp_path / "runs").exists()
    assert time.time() - started < 60


def test_unknown_key_in_train_yaml_is_named(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"source": "demo-tiny"}, "data": {"train": str(DATA)}, "output": {"name": "x"},
                                   "optim": {"learning_rate": 0.1}}))
    r = subprocess.run([sys.executable, "-m", "homefire.cli", "train", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "optim.learning_rate: unknown key" in r.stderr and "lr" in r.stderr


def test_pretraining_the_demo_model_lowers_held_out_perplexity_and_is_cached(ray_cluster):
    from homefire.models.pretrain import PretrainRecipe, ensure_pretrained

    recipe = PretrainRecipe(epochs=1, lr=5e-3, max_length=64, batch_size=16, workers=2)
    entry = ensure_pretrained("demo-tiny", Registry(), recipe=recipe)
    before, after = entry.metrics["eval_before"]["perplexity"], entry.metrics["eval_after"]["perplexity"]
    assert after < 0.5 * before, (before, after)
    assert entry.kind == "base" and entry.parent == "demo-tiny@1" and entry.recipe_hash.startswith("pretrain-")
    assert entry.config["lineage"]["data"] == "pydoc_data.topics"
    assert Registry().get("demo-tiny").ref == entry.ref  # what `homefire serve` now serves
    t0 = time.time()
    assert ensure_pretrained("demo-tiny", Registry(), recipe=recipe).ref == entry.ref
    assert time.time() - t0 < 5
    assert sha256_file(Path(entry.path) / "model.safetensors") == entry.files["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [
    {"stage": 2},
    {"stage": 3, "offload_optimizer": True, "offload_params": True},
], ids=["zero2", "zero3-offload"])
def test_deepspeed_zero_trains_on_cpu_with_gloo_and_exports_the_adapter(ray_cluster, tmp_path, deepspeed):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    name = f"answer-ds{deepspeed['stage']}"
    report = run_training(_cfg(tmp_path, name, deepspeed=deepspeed, **{"optim.max_steps": 20}))
    assert report.status == "finished" and report.steps == 20 and report.deepspeed["stage"] == deepspeed["stage"]
    assert report.eval_after["eval_loss"] < 0.7 * report.eval_before["eval_loss"]
    entry = Registry().get(name)
    weights = load_file(str(Path(entry.path) / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(v.numel() > 0 for v in lora_b)  # 2 layers x 7 projections, gathered whole
    assert max(float(v.abs().max()) for v in lora_b) > 1e-3  # trained, not the zero init
    base = AutoModelForCausalLM.from_pretrained(Registry().get(entry.parent).path)
    PeftModel.from_pretrained(base, entry.path)  # loads as a plain PEFT adapter
