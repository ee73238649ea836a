"""Ray Train wiring: config in, a finished run (report, loss curve, registry entry) out.

    from homefire.train import load_train_config, run_training
    report = run_training(load_train_config("train/configs/demo-lora.yaml"))

The driver checks the config and the data before any worker starts (a bad row fails here,
named by file and line), runs a ``TorchTrainer`` with the config's ``ScalingConfig``,
``FailureConfig`` and ``CheckpointConfig``, then writes the run report and hands the result
to the registry (:mod:`homefire.train.export`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError
from homefire.registry import Registry
from homefire.train.config import TrainConfig

REPORT_FILE = "report.json"
CURVE_FILE = "loss_curve.png"


@dataclass
class RunReport:
    """What a run produced; also written as ``report.json`` in the run directory."""

    run_id: str
    run_dir: str
    status: str
    steps: int
    final_loss: float | None
    eval_before: dict[str, Any]
    eval_after: dict[str, Any]
    exact_match: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    artifact: str | None = None
    entry: str | None = None
    workers: int = 1
    method: str = "lora"
    deepspeed: dict | None = None

    def summary(self) -> str:
        """The table printed at the end of a run."""
        rows = [
            ("run", self.run_id), ("status", self.status), ("method", self.method + (f" + ZeRO-{self.deepspeed['stage']}" if self.deepspeed else "")),
            ("workers", self.workers), ("steps", self.steps),
            ("trainable params", f"{self.trainable_params:,} of {self.total_params:,} ({100 * self.trainable_params / max(self.total_params, 1):.2f}%)"),
            ("train loss (last)", f"{self.final_loss:.4f}" if self.final_loss is not None else "-"),
            ("eval loss  before → after", f"{self.eval_before.get('eval_loss', float('nan')):.4f} → {self.eval_after.get('eval_loss', float('nan')):.4f}"),
            ("perplexity before → after", f"{self.eval_before.get('perplexity', float('nan')):.2f} → {self.eval_after.get('perplexity', float('nan')):.2f}"),
        ]
        if self.exact_match:
            em = self.exact_match
            rows.append(("exact match before → after", f"{em['before']:.1%} → {em['after']:.1%} (n={em['n']})"))
        rows += [
            ("examples (train/eval)", f"{self.data.get('train_examples', 0)}/{self.data.get('eval_examples', 0)}; "
             f"{self.data.get('truncated', 0)} truncated at {self.data.get('max_length')} tokens"),
            ("throughput", f"{self.tokens_per_s:,.0f} tokens/s"), ("wall time", f"{self.wall_s:.0f} s"),
            ("resumed after failures", len(self.resumes)), ("registry entry", self.entry or "-"), ("run dir", self.run_dir),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _ensure_ray(address: str | None, cfg: TrainConfig, log_to_driver: bool) -> None:
    """Connect to (or start) Ray. Without ``log_to_driver`` the workers' own lines (Ray, torch, DeepSpeed) stay in
    the session's log folder, printed once; homefire's progress lines reach the terminal through the run's
    progress log instead."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):  # a cluster, or inside `ray job submit` (which sets RAY_ADDRESS)
        ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver)
    else:
        # Logical CPUs: every worker plus room for Ray Data's readers next to them (oversubscribed on small boxes).
        need = math.ceil(cfg.scaling.workers * cfg.scaling.cpus_per_worker) + 2
        ray.init(num_cpus=max(os.cpu_count() or 1, need), dashboard_host="127.0.0.1", logging_level="WARNING",
                 log_to_driver=log_to_driver)
    if not log_to_driver:
        logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
        print(f"[homefire train] Ray and worker logs: {logs}  (--verbose prints them here)", flush=True)


class _ProgressTail:
    """Prints the lines rank 0 appends to the run's progress log, while ``fit`` runs (a thread in the driver)."""

    def __init__(self, path: Path | None):
        self.path, self._stop = path, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if path is not None else None

    def __enter__(self) -> "_ProgressTail":
        if self._thread is not None:
            self._offset = self.path.stat().st_size if self.path.exists() else 0  # a resumed run's old lines
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(0.5)
            if self.path.exists():
                with open(self.path) as f:
                    f.seek(self._offset)
                    text = f.read()
                cut = text.rfind("\n") + 1  # whole lines only
                if cut:
                    sys.stdout.write(text[:cut])
                    sys.stdout.flush()
                    self._offset += len(text[:cut].encode())
            if stopping:
                return


def resolve_base(cfg: TrainConfig, registry: Registry) -> tuple[str, str, str]:
    """(path the workers load, lineage reference, content hash) of the base model."""
    from homefire.models.build import resolve_source

    path, entry = resolve_source(cfg.model.source, registry)
    if entry is not None:
        return path, entry.ref, _files_hash(entry.files)
    return path, cfg.model.source, _dir_hash(path) if Path(path).is_dir() else "hub:" + cfg.model.source


def check_teacher(cfg: TrainConfig, registry: Registry, student_path: str, student_tokenizer) -> str:
    """The teacher's path, after checking it shares the student's vocabulary (same token ids, same logit width);
    ConfigError naming ``distill.teacher`` otherwise."""
    from transformers import AutoConfig, AutoTokenizer

    from homefire.models.build import resolve_source

    path, _ = resolve_source(cfg.distill.teacher, registry)
    kw = {"trust_remote_code": cfg.model.trust_remote_code}
    teacher_tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    vocab_t, vocab_s = AutoConfig.from_pretrained(path, **kw).vocab_size, AutoConfig.from_pretrained(student_path, **kw).vocab_size
    if vocab_t != vocab_s or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(
            f"distill.teacher {cfg.distill.teacher}: its vocabulary ({vocab_t} logits, {len(teacher_tokenizer)} tokens) "
            f"is not the student's ({vocab_s} logits, {len(student_tokenizer)} tokens); the KL compares distributions "
            "over the same token ids. Fix: a teacher from the same model family and tokenizer as model.source"
        )
    return path


def _files_hash(files: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _dir_hash(path: str) -> str:
    from homefire.registry import sha256_file

    return _files_hash({str(p.relative_to(path)): sha256_file(p) for p in sorted(Path(path).rglob("*.safetensors"))})


def new_run_id(cfg: TrainConfig) -> str:
    return f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(p for p in run_dir.glob("checkpoint_step_*") if (p / "trainer_state.json").is_file())
    return ckpts[-1] if ckpts else None


def run_training(
    cfg: TrainConfig,
    *,
    address: str | None = None,
    resume: str | None = None,
    registry: Registry | None = None,
    prepared=None,
    quiet: bool = False,
    verbose: bool = False,
    recipe_hash: str | None = None,
) -> RunReport:
    """Run one fine-tuning job end to end and return its report.

    Args:
        cfg: the validated training config.
        address: a running Ray cluster (``auto`` or ``host:port``); default: start a local Ray.
        resume: a run id (or run directory) to continue from its last checkpoint.
        registry: where the base model is found and the result registered (default: ``$HOMEFIRE_HOME``).
        prepared: already tokenized data (:class:`~homefire.train.data.PreparedData`), e.g. from `build-demo`.
        quiet: no start line (the caller reports progress).
        verbose: the workers' own output (Ray, torch, DeepSpeed) on the terminal too, not only in Ray's log folder.
        recipe_hash: kept on the registered entry, so a caller can find this exact result again.

    Raises:
        ConfigError / DataError: before any worker starts, naming the key or the file and line.
    """
    from transformers import AutoTokenizer

    from homefire.train.data import prepare_data

    t0 = time.time()
    registry = registry or Registry()
    if cfg.lora.quantize != "none" and cfg.method == "lora":
        _check_qlora(cfg)
    model_path, base_ref, base_hash = resolve_base(cfg, registry)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher_path = check_teacher(cfg, registry, model_path, tokenizer) if cfg.method == "distill" else None
    data = prepared or prepare_data(cfg.data, tokenizer)
    per_worker = data.train.num_rows // cfg.scaling.workers
    steps_per_epoch = per_worker // cfg.optim.batch_size // cfg.optim.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{data.train.num_rows} training examples are too few for {cfg.scaling.workers} worker(s) × batch_size "
            f"{cfg.optim.batch_size} × grad_accum {cfg.optim.grad_accum}. Fix: lower optim.batch_size or add data"
        )
    total_steps = cfg.optim.max_steps or steps_per_epoch * cfg.optim.epochs

    root = cfg.run_root()
    resume_from = None
    if resume:
        run_dir = Path(resume) if Path(resume).is_dir() else Path(root) / resume
        if not run_dir.is_dir():
            raise ConfigError(f"run '{resume}' not found under {root}. Fix: pass a run id from {root} or a run directory")
        run_id, root = run_dir.name, str(run_dir.parent)
        # Ray Train restores a run from its checkpoint snapshot when the same name is reused; a checkpoint
        # written just before the driver died may be missing there, so the workers also get the newest on disk.
        resume_from = _latest_checkpoint(run_dir)
        if resume_from is None:
            raise ConfigError(f"run {run_dir} has no checkpoint to resume from. Fix: start a new run")
    else:
        run_id = new_run_id(cfg)
    run_dir = Path(root) / run_id
    local = "://" not in root
    if local:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # The workers' own output reaches the terminal only when asked (or when no local run dir can carry the progress
    # lines); a Ray started by someone else keeps its own setting.
    tail = local and not verbose and not ray.is_initialized()
    _ensure_ray(address, cfg, log_to_driver=not tail)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # the step lines are the progress display
    data_ctx.print_on_execution_start = False
    datasets = {"train": ray.data.from_arrow(data.train), "eval": ray.data.from_arrow(data.eval)}
    job = {
        "model_path": model_path, "pad_id": tokenizer.pad_token_id, "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch, "metrics_log": str(run_dir / "metrics.jsonl") if local else None,
        "progress_log": str(run_dir / "progress.log") if tail else None,
        "resume_from": str(resume_from) if resume_from else None, "teacher_path": teacher_path,
    }
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    trainer = TorchTrainer(
        _train_fn(),
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "job": job},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_id, storage_path=root, failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep + 1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        # The same rows reach the same worker in the same order on every attempt: a resumed run replays exactly.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    if not quiet:
        print(f"[homefire train] run {run_id}: {cfg.method} on {base_ref}, {cfg.scaling.workers} worker(s), "
              f"{total_steps} steps, {data.stats['train_examples']} examples; run dir {run_dir}", flush=True)
    with _ProgressTail(run_dir / "progress.log" if tail else None):
        result = trainer.fit()
    metrics = result.metrics or {}
    state = metrics.get("state") or {}
    ckpt_dir = None
    if result.checkpoint is not None:
        # A shared URI (s3://, gs://) is fetched to local disk so the artifact can be evaluated and registered.
        ckpt_dir = Path(result.checkpoint.path) if local else Path(result.checkpoint.to_directory())
    artifact = ckpt_dir / "artifact" if ckpt_dir is not None and (ckpt_dir / "artifact").is_dir() else None
    evals = state.get("evals", [])
    history = state.get("history", [])
    rates = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    report = RunReport(
        run_id=run_id, run_dir=str(run_dir), status="finished" if artifact else "failed", steps=state.get("step", 0),
        final_loss=history[-1]["loss"] if history else None,
        eval_before=next((e for e in evals if e["step"] == 0), {}), eval_after=evals[-1] if evals else {},
        data={**data.stats, "data_hash": data.data_hash}, history=history, evals=evals, resumes=state.get("resumes", []),
        trainable_params=state.get("trainable_params", 0), total_params=state.get("total_params", 0),
        tokens_per_s=round(sum(rates) / len(rates), 1) if rates else 0.0, artifact=str(artifact) if artifact else None,
        workers=cfg.scaling.workers, method=cfg.method, deepspeed=cfg.deepspeed.model_dump() if cfg.deepspeed else None,
    )
    if artifact is not None and cfg.eval.exact_match and data.eval_examples:
        from homefire.train.evaluate import exact_match_before_after

        report.exact_match = exact_match_before_after(cfg, model_path, str(artifact), data.eval_examples)
    if artifact is not None and cfg.output.to_registry:
        from homefire.train.export import register_result

        entry = register_result(cfg, registry, artifact, report, base_ref=base_ref, base_hash=base_hash, model_path=model_path,
                                recipe_hash=recipe_hash)
        report.entry = entry
    report.wall_s = round(time.time() - t0, 1)
    write_report(report, run_dir if local else None)
    return report


def _train_fn():
    from homefire.train.recipe import train_loop_per_worker

    return train_loop_per_worker


def _check_qlora(cfg: TrainConfig) -> None:
    import importlib.util

    import torch

    if not (cfg.scaling.use_gpu and torch.cuda.is_available()):
        raise ConfigError(
            f"lora.quantize: {cfg.lora.quantize} (QLoRA) needs CUDA GPUs and bitsandbytes; this run has "
            f"{'no CUDA device' if not torch.cuda.is_available() else 'scaling.use_gpu: false'}. "
            "Fix: set lora.quantize: none, or run on GPU workers with scaling.use_gpu: true"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.quantize needs bitsandbytes. Fix: pip install bitsandbytes (CUDA machines)")


def write_report(report: RunReport, run_dir: Path | None) -> None:
    """report.json and the loss-curve PNG in the run directory."""
    if run_dir is None:
        return
    (run_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    if not report.history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in report.history], [h["loss"] for h in report.history], label="train loss")
    ev = [e for e in report.evals if e.get("eval_loss") == e.get("eval_loss")]
    if ev:
        ax.plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], "o--", label="eval loss")
    for r in report.resumes:
        ax.axvline(r["from_step"], color="grey", linestyle=":", label="resumed from checkpoint")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{report.run_id}: {report.method}, {report.workers} worker(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / CURVE_FILE, dpi=110)
    plt.close(fig)


__all__ = ["RunReport", "new_run_id", "run_training", "write_report"]
