"""Training benchmark: tokens/s for 1 vs 2 workers and LoRA vs full fine-tuning, side by side in one run.

    python benchmarks/train_bench.py                 # the demo model (~5M params), 60 steps per setting (~5 min)
    python benchmarks/train_bench.py --quick         # demo-tiny, 20 steps per setting
    python benchmarks/train_bench.py --model wide --settings lora-2w,full-2w --steps 15 --seq-len 128 \
        --batch-size 4                               # a ~60M-param model: how LoRA/full moves with size

Every setting is one real `homefire train` run (Ray Train workers, gloo, the same recipe and checkpoints) on the
same packed text (pydoc's topics, blocks of --seq-len tokens, --batch-size blocks per worker per step), sharing one
local Ray. Throughput is training tokens (input tokens of every worker) per second of wall time between step lines,
the first interval (warm-up) left out. Settings:

* ``lora-1w-1cpu`` / ``lora-2w`` / ``full-1w-1cpu`` / ``full-2w``: 1 worker with 1 logical CPU (Ray sets its
  OMP threads to 1) vs 2 workers with 1 CPU each: the data-parallel scaling the targets are about;
* ``lora-1w-2cpu`` / ``full-1w-2cpu``: 1 worker owning both cores (2 threads): what one process gets from the box.

Targets: 2 workers / 1 worker (1 CPU each) >= 1.6; LoRA / full at 2 workers >= 1.3.
Writes ``OUT/train_bench[-MODEL].json`` and ``.png`` (no suffix for the demo model) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

#: Benchmark-only shapes (built offline like the demo models): hidden 1024, 4 layers, ~60M parameters.
BENCH_RECIPES = {"wide": dict(name="bench-wide", hidden_size=1024, intermediate_size=2752, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=8)}

SETTINGS = {
    "lora-1w-1cpu": ("lora", 1, 1.0),
    "lora-1w-2cpu": ("lora", 1, 2.0),
    "lora-2w": ("lora", 2, 1.0),
    "full-1w-1cpu": ("full", 1, 1.0),
    "full-1w-2cpu": ("full", 1, 2.0),
    "full-2w": ("full", 2, 1.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo ~5M, demo-tiny ~0.8M, wide ~60M params")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per setting")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per worker per step")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ", ".join(SETTINGS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quick", action="store_true", help="demo-tiny, 20 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps = "demo-tiny", 20
    return args


def run_setting(name: str, args, prepared_by_model: dict, registry) -> dict:
    from transformers import AutoTokenizer

    from homefire.models.build import DEMO_RECIPES, ModelRecipe, ensure_model
    from homefire.models.pretrain import corpus_rows
    from homefire.train.config import TrainConfig
    from homefire.train.data import prepare_data
    from homefire.train.trainer import run_training

    method, workers, cpus = SETTINGS[name]
    recipe = DEMO_RECIPES.get(args.model) or ModelRecipe(**BENCH_RECIPES[args.model])
    base = ensure_model(recipe, registry)
    cfg = TrainConfig.model_validate({
        "model": {"source": base.path}, "method": method,
        "data": {"train": "pydoc_data/topics.py", "format": "text", "max_length": args.seq_len, "eval_fraction": 0.02},
        "optim": {"lr": 1e-3, "batch_size": args.batch_size, "max_steps": args.steps},
        "scaling": {"workers": workers, "cpus_per_worker": cpus},
        "checkpoint": {"every_n_steps": 10 * args.steps}, "eval": {"max_batches": 1},
        "output": {"name": f"bench-{name}", "to_registry": False},
        "storage_path": str(Path(args.out) / "raw" / "train_runs"), "log_every_n_steps": 5,
    })
    if base.path not in prepared_by_model:
        prepared_by_model[base.path] = prepare_data(cfg.data, AutoTokenizer.from_pretrained(base.path), rows=corpus_rows())
    report = run_training(cfg, registry=registry, prepared=prepared_by_model[base.path], quiet=True)
    rates = [h["tokens_per_s"] for h in report.history[1:]]
    return {
        "setting": name, "method": method, "workers": workers, "cpus_per_worker": cpus,
        "tokens_per_s": round(sum(rates) / len(rates), 1), "tokens_per_s_intervals": rates,
        "trainable_params": report.trainable_params, "total_params": report.total_params,
        "final_loss": report.final_loss, "steps": report.steps, "wall_s": report.wall_s,
    }


def _ratio(results: dict, a: str, b: str) -> float | None:
    if a in results and b in results and results[b]["tokens_per_s"]:
        return round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 3)
    return None


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["results"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(rows)
    colors = ["tab:blue" if rows[n]["method"] == "lora" else "tab:orange" for n in names]
    ax.bar(names, [rows[n]["tokens_per_s"] for n in names], color=colors)
    for i, n in enumerate(names):
        ax.text(i, rows[n]["tokens_per_s"], f"{rows[n]['tokens_per_s']:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("training tokens / s")
    r = summary["ratios"]
    ax.set_title(f"homefire train on {summary['model']} ({summary['machine']['cpus']} CPU cores): "
                 f"2w/1w LoRA {r['lora_2w_over_1w']}, full {r['full_2w_over_1w']}; LoRA/full {r['lora_over_full_2w']}",
                 fontsize=9)
    plt.xticks(rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray
    import torch

    from homefire.registry import Registry

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=max(6, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    registry, prepared, results = Registry(), {}, {}
    try:
        for n in names:
            t0 = time.time()
            results[n] = run_setting(n, args, prepared, registry)
            print(f"{n:<14} {results[n]['tokens_per_s']:>10,.0f} tok/s   ({time.time() - t0:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    summary = {
        "model": args.model, "steps": args.steps, "seq_len": args.seq_len, "batch_size_per_worker": args.batch_size,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "torch_threads_driver": torch.get_num_threads()},
        "results": results,
        "ratios": {
            "lora_2w_over_1w": _ratio(results, "lora-2w", "lora-1w-1cpu"),
            "full_2w_over_1w": _ratio(results, "full-2w", "full-1w-1cpu"),
            "lora_2w_over_1w_2cpu": _ratio(results, "lora-2w", "lora-1w-2cpu"),
            "full_2w_over_1w_2cpu": _ratio(results, "full-2w", "full-1w-2cpu"),
            "lora_over_full_2w": _ratio(results, "lora-2w", "full-2w"),
            "lora_over_full_1w": _ratio(results, "lora-1w-1cpu", "full-1w-1cpu"),
        },
        "targets": {"2w_over_1w": 1.6, "lora_over_full": 1.3},
    }
    stem = "train_bench" if args.model == "demo" else f"train_bench-{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / f"{stem}.png")
    print("\n" + "\n".join(f"  {k:<24} {v}" for k, v in summary["ratios"].items()))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
