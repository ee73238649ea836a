"""`homefire tune`: a Ray Tune experiment with one trial per variant, then the report and the winner's serve config.

The experiment lives in ``<storage>/<name>/`` (Ray Tune's own state, so ``--resume`` continues a sweep whose driver
was killed: finished trials are kept, unfinished and errored ones run again) next to ``report.{json,md}``,
``pareto.png`` and ``serve.yaml``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError
from homefire.tune.config import TuneConfig, check_space
from homefire.tune.trial import ORIGINAL, trainable

logger = logging.getLogger(__name__)


@dataclass
class TuneReport:
    experiment_dir: Path
    summary: dict[str, Any]

    @property
    def best(self) -> str | None:
        return self.summary.get("best")


_QUALITY_KEYS = ("variant", "engine", "format", "perplexity", "scored_tokens", "task_score", "task_n")


def _progress_callback(total: int):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per finished trial with its numbers, and the live count."""

        def __init__(self) -> None:
            self.done = self.failed = self.skipped = self.stopped = 0

        def _count(self, trials, this) -> str:
            running = sum(t.status == "RUNNING" and t is not this for t in trials)
            stopped = f" / {self.stopped} stopped" if self.stopped else ""
            return (f"[{self.done} done / {running} running / {self.failed} failed / {self.skipped} skipped{stopped} "
                    f"of {total}]")

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            variant = result.get("variant", "?")
            if result.get("status") == "measuring":  # ASHA's quality rung
                task = f"  task {result['task_score']:.1%}" if "task_score" in result else ""
                print(f"  {variant:<12} {result.get('engine', ''):<12} ppl {result.get('perplexity', 0):.2f}{task}  "
                      f"(quality rung: speed next unless ASHA stops it)", flush=True)
                return
            if result.get("status") == "skipped":
                self.skipped += 1
                print(f"  {variant:<12} skipped: {result.get('reason')}  {self._count(trials, trial)}", flush=True)
                return
            self.done += 1
            speeds = "  ".join(f"{k[:-13]} {v:.0f} tok/s" for k, v in result.items() if k.endswith("_output_tok_s"))
            print(f"  {variant:<12} {result.get('engine', ''):<12} ppl {result.get('perplexity', 0):.2f}  {speeds}  "
                  f"{result.get('size_bytes', 0) / 1e6:.1f} MB  {self._count(trials, trial)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            last = trial.last_result or {}
            if last.get("status") == "measuring":
                self.stopped += 1
                print(f"  {last.get('variant', '?'):<12} stopped by ASHA after its quality rung (ppl "
                      f"{last.get('perplexity', 0):.2f})  {self._count(trials, trial)}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.failed += 1
            print(f"  {trial.config.get('variant', '?'):<12} failed (see {trial.path})  {self._count(trials, trial)}",
                  flush=True)

    return Progress()


def _ensure_ray(address: str | None, cfg: TuneConfig, log_to_driver: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver)
        return
    # Logical CPUs: a trial's engine has its own threads; more logical CPUs than cores is fine for one trial at a time.
    need = int(cfg.cpus_per_trial * cfg.max_concurrent_trials) + 1
    if any("+distill" in v for v in cfg.space.variants()):  # a trial's Ray Train workers run beside the trial itself
        d = cfg.space.distill_settings()
        need += int(d.workers * d.cpus_per_worker * cfg.max_concurrent_trials) + 2
    ray.init(num_cpus=max(os.cpu_count() or 1, need), dashboard_host="127.0.0.1", include_dashboard=False,
             logging_level="WARNING", log_to_driver=log_to_driver)
    if not log_to_driver:
        logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
        print(f"Ray, trial and engine logs: {logs}  (--verbose prints them here)", flush=True)


def _optuna_tuner(cfg: TuneConfig, fn, run_config):
    """Optuna's multi-objective TPE over the space (format x pruning), the original evaluated first."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space: dict[str, Any] = {"tune": cfg.model_dump(mode="json")}
    first: dict[str, Any] = {}
    for key, choices in cfg.space.optuna_space().items():
        if isinstance(choices, tuple):
            lo, hi, step = choices
            space[key] = tune.qrandint(lo, hi, step)
            first[key] = 0
        else:
            space[key] = tune.choice(choices)
            first[key] = "none"
    c = cfg.select.concurrency
    searcher = OptunaSearch(metric=["perplexity", f"c{c}_output_tok_s"], mode=["min", "max"],
                            points_to_evaluate=[first], seed=0)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent_trials)
    return tune.Tuner(fn, param_space=space, run_config=run_config,
                      tune_config=tune.TuneConfig(search_alg=searcher, num_samples=cfg.num_samples + 1,
                                                  scheduler=_scheduler(cfg)))


def _scheduler(cfg: TuneConfig):
    """ASHA over the two measurement stages (quality at iteration 1, speed at 2), or None (FIFO)."""
    if cfg.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(metric="perplexity", mode="min", time_attr="training_iteration", max_t=2, grace_period=1,
                         reduction_factor=cfg.reduction_factor)


def run_tune(cfg: TuneConfig, address: str | None = None, resume: str | None = None, verbose: bool = False) -> TuneReport:
    """Run (or with ``resume``, continue) the sweep; write the report; return where it is and the winner.
    ``verbose``: the trials' own output (engine start-up lines) on the terminal too, not only in Ray's log folder."""
    from ray import tune

    from homefire.models.build import resolve_source
    from homefire.tune import report

    src, entry = resolve_source(cfg.model.source)  # a bad source, or a variant it cannot become, fails before Ray
    check_space(cfg, src)
    served_name = entry.name if entry is not None else Path(cfg.model.source).name
    _ensure_ray(address, cfg, log_to_driver=verbose)
    fn = tune.with_resources(trainable, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    variants = [ORIGINAL, *cfg.space.variants()] if cfg.search == "grid" else []
    total = len(variants) or cfg.num_samples + 1
    run_config = tune.RunConfig(
        name=cfg.name, storage_path=str(Path(cfg.run_root).expanduser().resolve()), verbose=0,
        callbacks=[_progress_callback(total)], failure_config=tune.FailureConfig(max_failures=0),
    )
    if resume:
        path = Path(resume).expanduser().resolve()
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"--resume {resume}: no Ray Tune experiment there. Fix: pass the directory `homefire "
                              "tune` printed (<storage>/<name>)")
        tuner = tune.Tuner.restore(str(path), fn, resume_errored=False, restart_errored=True)
    elif cfg.search == "grid":
        tuner = tune.Tuner(
            fn, param_space={"tune": cfg.model_dump(mode="json"), "variant": tune.grid_search(variants)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, scheduler=_scheduler(cfg)),
            run_config=run_config,
        )
    else:
        tuner = _optuna_tuner(cfg, fn, run_config)
    what = ", ".join(variants) if variants else f"original + {cfg.num_samples} chosen by Optuna from {cfg.space.optuna_space()}"
    started = time.time()
    print(f"homefire tune {cfg.name}: {total} trials ({what}) on {cfg.model.source}", flush=True)
    grid = tuner.fit()
    rows = []
    for r in grid:
        if r.error is not None:
            rows.append({"variant": r.config.get("variant", "?"), "status": "failed", "error": str(r.error)[:2000]})
        elif r.metrics and r.metrics.get("status") == "measuring":
            rows.append({**{k: v for k, v in r.metrics.items() if k in _QUALITY_KEYS}, "status": "stopped",
                         "reason": "ASHA stopped it after its quality rung (its perplexity was not among the best "
                                   f"1/{cfg.reduction_factor} so far): speed not measured"})
        elif r.metrics:
            rows.append({k: v for k, v in r.metrics.items() if not k.startswith(("time_", "config", "trial_"))
                         and k not in ("timestamp", "date", "hostname", "node_ip", "pid", "training_iteration",
                                       "done", "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint")})
    order = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: order.get(r.get("variant"), len(order)))
    rows = list({r.get("variant"): r for r in reversed(rows)}.values())[::-1]  # Optuna may pick a point twice
    out_dir = Path(grid.experiment_path)
    summary = report.write(cfg, rows, out_dir, served_name)
    summary["duration_s"] = round(time.time() - started)
    return TuneReport(out_dir, summary)
