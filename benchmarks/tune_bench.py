"""Tune benchmark: the best CPU variant's decode speed over fp32 transformers within 2 % perplexity, side by side in
one run, on the pretrained demo model and on a larger pretrained shape where speed is not engine overhead.

    python benchmarks/tune_bench.py                       # demo (~5M) and wide (~60M), the quantized formats
    python benchmarks/tune_bench.py --models demo --quick # smoke check: demo, two formats, short measurements
    python benchmarks/tune_bench.py --variants gguf-q4_0,gguf-q8_0,prune-mlp-25

Each model is one real `homefire tune` sweep (Ray Tune, one trial at a time, every variant converted and measured on
the engine that would serve it; the original on fp32 transformers is the reference), as a user runs it. Quality only
means something on a trained model: ``demo`` is the pretrained demo (`homefire models build-demo`), ``wide`` (hidden
1024, 4 layers, ~60M parameters) is pretrained here once on the same text through the same pipeline (one epoch, a few
minutes on 2 cores; cached in the registry). Perplexity is on the shipped held-out text, not in either's training data.

Goal (issue 9): the best variant within +2 % perplexity decodes >= 2x fp32 transformers. Writes
``OUT/tune_bench.json`` (every row of both sweeps, the winner per concurrency and its speedup) and ``.png`` (speedup
vs perplexity change per variant, one panel per model) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_bench import BENCH_RECIPES  # noqa: E402  (benchmarks are scripts side by side, never a package)

VARIANTS = ["onnx-int8", "onnx-int4", "gguf-q8_0", "gguf-q4_0", "vllm-w8a8", "vllm-w4a16"]
#: One epoch of pydoc's topics for the ~60M shape (about 4 minutes of 2 workers on 2 cores).
WIDE_PRETRAIN = dict(epochs=1, lr=1e-3, batch_size=8, max_length=256, workers=2)


def log(msg: str) -> None:
    print(f"[tune_bench {datetime.now():%H:%M:%S}] {msg}", flush=True)


def model_source(name: str) -> str:
    """A registry reference to the pretrained model ``name`` (trained now when missing)."""
    from homefire.models.build import ModelRecipe
    from homefire.models.pretrain import PretrainRecipe, ensure_pretrained

    if name == "demo":
        return ensure_pretrained("demo").ref
    log(f"pretraining {name} (cached after the first run) ...")
    return ensure_pretrained(BENCH_RECIPES[name]["name"], recipe=PretrainRecipe(**WIDE_PRETRAIN),
                             model=ModelRecipe(**BENCH_RECIPES[name])).ref


def cpu_label() -> str:
    from homefire.convert.compressed import cpu_flags

    flags = cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{model}; {', '.join(have)}"


def sweep(name: str, source: str, variants: list[str], quick: bool, out_root: Path) -> dict:
    from homefire.convert.compressed import cpu_flags
    from homefire.tune import run_tune
    from homefire.tune.config import TuneConfig

    if "avx512f" not in cpu_flags():
        variants = [v for v in variants if v != "vllm-w4a16"]  # refused by the config: needs AVX-512
    cfg = TuneConfig.model_validate({
        "name": f"bench-{name}", "model": {"source": source},
        "space": {"quantize": [v for v in variants if not v.startswith("prune-")],
                  "prune": [v.removeprefix("prune-") for v in variants if v.startswith("prune-")]},
        "eval": {"max_tokens": 512 if quick else 1024, "window": 256},
        "speed": {"concurrency": [1, 8], "prompts": 8, "input_len": 64, "output_len": 16 if quick else 32},
        "select": {"max_ppl_increase": 0.02, "concurrency": 1},
        "storage_path": str(out_root),
    })
    log(f"{name}: sweeping {', '.join(cfg.space.variants())} on {source}")
    t0 = time.time()
    report = run_tune(cfg)
    summary = report.summary
    summary["wall_s"] = round(time.time() - t0)
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, summary) in zip(axes[0], results.items()):
        rows = [r for r in summary["rows"] if r.get("status") == "ok"]
        for r in rows:
            best = r["variant"] == summary.get("best")
            ax.scatter(r["c1_speedup"], r["ppl_increase"] * 100, s=60, color="tab:red" if best else "tab:blue",
                       edgecolors="k")
            ax.annotate(r["variant"], (r["c1_speedup"], r["ppl_increase"] * 100), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.axhline(2, ls="--", color="gray", lw=1)
        ax.axvline(2, ls=":", color="gray", lw=1)
        ax.set_title(f"{name}: decode speedup at 1 stream vs perplexity change")
        ax.set_xlabel("decode tok/s over fp32 transformers (1 stream)")
        ax.set_ylabel("perplexity change (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,wide", help="comma-separated: demo, wide")
    p.add_argument("--variants", default=",".join(VARIANTS), help="formats and prune-* targets to sweep")
    p.add_argument("--quick", action="store_true", help="demo only, two formats, shorter measurements")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where the JSON and PNG go")
    args = p.parse_args()
    models = ["demo"] if args.quick else args.models.split(",")
    variants = ["gguf-q4_0", "onnx-int4"] if args.quick else args.variants.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        for name in models:
            results[name] = sweep(name, model_source(name), variants, args.quick, Path(tmp))
    doc = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": cpu_label(), "cores": _cores(),
           "goal": "best variant within +2% perplexity decodes >= 2x fp32 transformers (1 stream)", "models": results}
    (out / "tune_bench.json").write_text(json.dumps(doc, indent=2, default=str))
    plot(results, out / "tune_bench.png")
    print(f"\n{'model':<6} {'variant':<14} {'engine':<12} {'ppl':>9} {'Δppl':>7} {'KL':>7} {'top-1':>6} "
          f"{'c1 x':>6} {'c8 x':>6} {'MB':>7}")
    for name, summary in results.items():
        for r in summary["rows"]:
            if r.get("status") != "ok":
                print(f"{name:<6} {r['variant']:<14} {r.get('status')}: {(r.get('reason') or r.get('error', ''))[:80]}")
                continue
            print(f"{name:<6} {r['variant']:<14} {r['engine']:<12} {r['perplexity']:>9.2f} {r['ppl_increase']:>+7.2%} "
                  f"{r['kl_to_original']:>7.2g} {r['top1_agreement']:>6.1%} {r['c1_speedup']:>6.2f} "
                  f"{r['c8_speedup']:>6.2f} {r['size_mb']:>7.1f}")
        best = summary.get("best")
        row = next((r for r in summary["rows"] if r["variant"] == best), None)
        print(f"  -> {name}: best within +2 % perplexity at 1 stream: {best or 'none'}"
              + (f", {row['c1_speedup']:.2f}x fp32 transformers" if row else "")
              + f"; at 8 streams: {summary.get('best_by_concurrency', {}).get(8)}  ({summary.get('wall_s')} s)")
    print(f"\nwrote {out / 'tune_bench.json'} and {out / 'tune_bench.png'}")
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
