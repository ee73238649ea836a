"""Engines benchmark: one model in several formats, each served by its engine through `homefire serve`,
side by side in one run, at 1 stream and at many.

    python benchmarks/engines_bench.py                        # demo + wide, every variant, concurrency 1 and 32
    python benchmarks/engines_bench.py --models demo --quick  # smoke check: demo only, 16 prompts
    python benchmarks/engines_bench.py --variants vllm,gguf-q8_0 --concurrency 1,8

Variants (``--variants``): ``vllm`` (the hf model, fp32), ``vllm-w8a8`` / ``vllm-w4a16`` (compressed-tensors),
``onnx-fp32`` / ``onnx-int8`` / ``onnx-int4`` (ONNX Runtime GenAI), ``gguf-f16`` / ``gguf-q8_0`` / ``gguf-q4_0``
(llama.cpp), and ``naive`` (FastAPI + one transformers ``generate`` per request: the fp32 transformers reference).
Models (``--models``): ``demo`` (the pretrained ~5M demo model when `homefire models build-demo` ran, else the
random one) and ``wide`` (~60M parameters, random init: where speed is not engine overhead).

Each variant is converted once (``homefire models convert``, cached in the registry by its recipe), then served
alone (one model per `homefire serve`, the box to itself) and measured with vLLM's serving benchmark client, as in
``serve_bench.py``: random prompts of 64 tokens in / 64 out, ``ignore_eos``, greedy. A variant the machine cannot
run (W4A16 without AVX-512, a missing engine) is recorded as skipped with the reason.

Writes ``OUT/engines_bench[-LABEL].json`` (per model and variant: output tok/s, p50 TTFT, p50 TPOT per concurrency,
size on disk, conversion time, and the ratio to vLLM fp32) and a ``.png`` (output tok/s per variant at each
concurrency, one panel per model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import serve_bench as sb  # noqa: E402  (benchmarks are scripts side by side, never a package)
from train_bench import BENCH_RECIPES  # noqa: E402

VARIANTS = ["vllm", "vllm-w8a8", "vllm-w4a16", "onnx-fp32", "onnx-int8", "onnx-int4", "gguf-f16", "gguf-q8_0",
            "gguf-q4_0", "naive"]
ENGINE_OF = {"vllm": "vllm", "onnx": "onnx", "gguf": "llamacpp"}


def log(msg: str) -> None:
    print(f"[engines_bench {datetime.now():%H:%M:%S}] {msg}", flush=True)


def model_entry(name: str):
    """The hf registry entry for a benchmark model (built offline, cached)."""
    from homefire.models.build import DEMO_RECIPES, ModelRecipe, ensure_model
    from homefire.registry import Registry

    reg = Registry()
    if name in DEMO_RECIPES:
        if not reg.versions(name):
            ensure_model(DEMO_RECIPES[name], reg)
        return reg.get(name)  # the newest: the pretrained one when build-demo ran
    return ensure_model(ModelRecipe(**BENCH_RECIPES[name]), reg)


def variant_entry(base, variant: str):
    """The registry entry serving ``variant`` of ``base`` (``homefire models convert`` reuses an earlier conversion)."""
    from homefire.convert import convert

    if variant in ("vllm", "naive"):
        return base
    log(f"{base.ref} -> {variant} ...")
    return convert(base.ref, variant)


def serve_config(entry, variant: str, workdir: Path) -> Path:
    engine = "vllm" if variant in ("vllm", "naive") else ENGINE_OF[variant.split("-")[0]]
    lines = [
        f"# engines_bench.py: {entry.ref} as {variant} on {engine}",
        "models:", f"  - name: {sb.SERVED_NAME}", f"    source: {entry.ref}", f"    engine: {engine}",
        "    cpus: 1", "    max_model_len: 1024",
    ]
    if engine == "onnx":
        lines.append("    max_concurrency: 2")
    path = workdir / f"{variant}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def server_for(variant: str, entry, hf_path: str, workdir: Path) -> sb.Server:
    port = sb._free_port()
    if variant == "naive":
        cmd = [sys.executable, str(Path(__file__).with_name("naive_server.py")), "--model", hf_path,
               "--served-model-name", sb.SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
        return sb.Server(variant, cmd, {}, ["/v1/models"], port)
    cfg = serve_config(entry, variant, workdir)
    cmd = [sys.executable, "-m", "homefire.cli", "serve", str(cfg), "--port", str(port)]
    return sb.Server(variant, cmd, {}, ["/ready", "/v1/models"], port)


def skip_reason(variant: str) -> str | None:
    """Why this machine cannot run ``variant`` (None when it can)."""
    import importlib.util

    needs = {"onnx": "onnxruntime_genai", "gguf": "llama_cpp"}.get(variant.split("-")[0])
    if needs and importlib.util.find_spec(needs) is None:
        return f"{needs} is not installed (make install)"
    if variant == "vllm-w4a16":
        from homefire.convert.compressed import cpu_flags

        if "avx512f" not in cpu_flags():
            return "needs AVX-512 (vLLM's CPU W4A16 kernels); this CPU has none"
    return None


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    marker = uuid.uuid4().hex
    raw_dir, log_dir = out / "raw", out / "logs"
    raw_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="engines-bench-") as tmp:
        for model in args.models:
            base = model_entry(model)
            results[model] = {"entry": base.ref, "variants": {}}
            for variant in args.variants:
                row: dict[str, Any] = {}
                results[model]["variants"][variant] = row
                reason = skip_reason(variant)
                if reason:
                    row["skipped"] = reason
                    log(f"{model}/{variant}: skipped ({reason})")
                    continue
                try:
                    entry = variant_entry(base, variant)
                except Exception as err:  # a conversion this machine cannot make is a result, not a crash
                    row["skipped"] = f"conversion failed: {err}"
                    log(f"{model}/{variant}: skipped ({row['skipped'][:200]})")
                    continue
                row.update(entry=entry.ref, size_mb=round(_size(entry.path) / 1e6, 2),
                           convert_s=entry.metrics.get("convert_s"))
                srv = server_for(variant, entry, base.path, Path(tmp))
                server_log = log_dir / f"{model}-{variant}.server.log"
                try:
                    sb.start_server(srv, server_log, marker, args.start_timeout)
                    sb.preflight(srv)
                    row["startup_s"] = round(srv.startup_s or 0, 1)
                    for c in args.concurrency:
                        r = sb.run_client(srv, args, c, base.path, raw_dir, log_dir, f"{args.prefix}-{model}")
                        row[f"c{c}"] = {k: r.get(k) for k in ("output_throughput", "p50_ttft_ms", "p50_tpot_ms",
                                                             "completed", "failed")}
                        log(f"{model}/{variant} c={c}: {r['output_throughput']:.0f} tok/s, "
                            f"p50 TTFT {r['p50_ttft_ms']:.0f} ms, p50 TPOT {r['p50_tpot_ms']:.1f} ms")
                except Exception as err:
                    row["error"] = str(err)[:2000]
                    log(f"{model}/{variant}: failed: {str(err)[:300]}")
                finally:
                    sb.stop_server(srv, marker)
            _ratios(results[model]["variants"], args.concurrency)
    return results


def _size(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _ratios(rows: dict[str, Any], concurrency: list[int]) -> None:
    ref = rows.get("vllm", {})
    for row in rows.values():
        for c in concurrency:
            mine, base = row.get(f"c{c}", {}).get("output_throughput"), ref.get(f"c{c}", {}).get("output_throughput")
            if mine and base:
                row[f"c{c}"]["vs_vllm_fp32"] = round(mine / base, 3)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary["results"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = summary["results"][model]["variants"]
        names = [v for v in rows if any(f"c{c}" in rows[v] for c in summary["concurrency"])]
        width = 0.8 / max(len(summary["concurrency"]), 1)
        for j, c in enumerate(summary["concurrency"]):
            vals = [rows[v].get(f"c{c}", {}).get("output_throughput") or 0 for v in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"{c} stream{'s' * (c > 1)}")
        ax.set_xticks([i + width * (len(summary["concurrency"]) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{model} ({summary['results'][model]['entry']})")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"homefire engines, {summary['machine']['cpu_model']} ({summary['machine']['nproc']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(summary: dict[str, Any]) -> None:
    cs = summary["concurrency"]
    head = f"{'model':<7} {'variant':<11} {'MB':>7} " + " ".join(f"{'c' + str(c) + ' tok/s':>11} {'ttft ms':>8} {'x vllm':>7}" for c in cs)
    print(head)
    for model, res in summary["results"].items():
        for variant, row in res["variants"].items():
            if "skipped" in row or "error" in row:
                print(f"{model:<7} {variant:<11} {'':>7} {('skipped: ' + row['skipped']) if 'skipped' in row else 'error'}"[:160])
                continue
            cells = []
            for c in cs:
                r = row.get(f"c{c}", {})
                cells.append(f"{sb._fmt(r.get('output_throughput'), '.0f'):>11} {sb._fmt(r.get('p50_ttft_ms'), '.0f'):>8} "
                             f"{sb._fmt(r.get('vs_vllm_fp32'), '.2f'):>7}")
            print(f"{model:<7} {variant:<11} {row.get('size_mb', 0):>7.1f} " + " ".join(cells))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: s.split(","), default=["demo", "wide"], help="demo,wide")
    p.add_argument("--variants", type=lambda s: s.split(","), default=VARIANTS, help=",".join(VARIANTS))
    p.add_argument("--concurrency", type=sb._csv_ints, default=[1, 32], help="stream counts (default 1,32)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--start-timeout", type=float, default=sb.SERVER_START_TIMEOUT_S)
    p.add_argument("--client-timeout", type=float, default=sb.CLIENT_TIMEOUT_S)
    p.add_argument("--quick", action="store_true", help="16 prompts, demo only")
    p.add_argument("--label", default="", help="suffix for the output files")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.num_prompts, args.models = 16, ["demo"]
    args.prefix = "engines"
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = measure(args, args.out)
    stem = "engines_bench" + (f"-{args.label}" if args.label else "")
    summary = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "duration_s": round(time.time() - t0),
        "machine": sb.machine_info(), "versions": sb.versions(), "concurrency": args.concurrency,
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len},
        "results": results,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / f"{stem}.png")
    print_table(summary)
    log(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
