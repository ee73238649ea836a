"""Tensor parallelism on this machine: the same model served by ``homefire serve`` with tensor_parallel 1 and 2,
output tok/s side by side, in one run.

    python benchmarks/parallel_bench.py                       # tp1, tp2; concurrency 1, 32; 32 prompts; 2 repeats
    python benchmarks/parallel_bench.py --variants tp1,tp1-all-cores,tp2 --concurrency 8 --num-prompts 16 --repeats 1

Variants (one runs at a time, each through every concurrency, then the next):

* ``tp1``: one vLLM worker, vLLM's own CPU thread binding (``VLLM_CPU_OMP_THREADS_BIND=auto``: the worker takes a
  NUMA node's cores less the ones vLLM reserves for its scheduler, one core on a 2-core box);
* ``tp1-all-cores``: one worker whose OpenMP pool takes every core (``VLLM_CPU_OMP_THREADS_BIND=0-N``), which it
  then shares with vLLM's scheduler and the API process;
* ``tp2``: ``tensor_parallel: 2``: two workers (vLLM's mp executor, shared-memory all-reduce), homefire splitting the
  cores between them ("0|1" on 2 cores).

Each starts as a user would (``homefire serve CONFIG``, a config written here, the model as ``demo``), and is
measured with vLLM's own serving client (``vllm.benchmarks.serve``); starting, stopping, the client and the process
clean-up are :mod:`serve_bench`'s own functions (imported, not copied). Writes
``OUT/parallel_bench[-LABEL].json`` and prints a table: output tok/s, p50 TTFT and p50 TPOT per variant and
concurrency, and each variant's tok/s over ``tp1``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # noqa: E402  (benchmarks/ is scripts, not a package)

VARIANTS = ("tp1", "tp1-all-cores", "tp2")
DEFAULT_VARIANTS = ("tp1", "tp2")


def log(msg: str) -> None:
    print(f"[parallel_bench {datetime.now():%H:%M:%S}] {msg}", flush=True)


def variant_config(name: str, model_path: str) -> tuple[str, dict[str, str]]:
    """(the homefire serve YAML of variant ``name``, environment for its server)."""
    cores = sorted(os.sched_getaffinity(0))
    tp = 2 if name == "tp2" else 1
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}"} if name == "tp1-all-cores" else {}
    yaml = (
        f"# parallel_bench.py: variant {name}\n"
        f"models:\n  - name: {sb.SERVED_NAME}\n    source: {model_path}\n    engine: vllm\n"
        f"    cpus: 1\n    max_model_len: 1024\n    max_loras: 0\n"
        + (f"    tensor_parallel: {tp}\n" if tp > 1 else "")
    )
    return yaml, env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallel_bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__)
    p.add_argument("--variants", type=sb.csv_choices(VARIANTS, "variant"),
                   default=list(DEFAULT_VARIANTS),
                   help=f"comma-separated, in run order, of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--concurrency", type=sb._csv_ints, default=[1, 32], help="--max-concurrency values (1,32)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per measurement (default: 32)")
    p.add_argument("--repeats", type=sb._int_at_least(1), default=2, help="measurements per point; median (2)")
    p.add_argument("--model", default=None, help="model directory (default: the offline demo model, 4 heads)")
    p.add_argument("--label", default=None, help="goes into the output file name")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None:
        from homefire.models.build import ensure_model

        args.model = str(ensure_model("demo").path)
    # serve_bench's client settings (64 in / 64 out, ignore_eos, greedy, 2 warm-ups, its SLOs), our sizes.
    client = sb.build_parser().parse_args(["--num-prompts", str(args.num_prompts)])
    out: Path = args.out
    raw_dir, log_dir = out / "raw", out / "logs"
    raw_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = "parallel_bench" + (f"-{args.label}" if args.label else "")
    summary: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": sb.machine_info(),
        "versions": sb.versions(), "model": args.model,
        "workload": {"client": "vllm.benchmarks.serve", "dataset": "random", "num_prompts": args.num_prompts,
                     "input_len": client.input_len, "output_len": client.output_len, "ignore_eos": True,
                     "temperature": 0.0, "concurrency": args.concurrency, "repeats": args.repeats},
        "variants": {},
    }
    marker = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="parallel-bench-") as tmp:
        for name in args.variants:
            yaml, env = variant_config(name, args.model)
            cfg = Path(tmp) / f"{name}.yaml"
            cfg.write_text(yaml)
            port = sb._free_port()
            srv = sb.Server(name, [sys.executable, "-m", "homefire.cli", "serve", str(cfg), "--port", str(port)], env,
                            ["/ready", "/v1/models"], port)
            entry: dict[str, Any] = {"config": yaml, "env": env, "startup_s": None, "error": None, "results": {}}
            summary["variants"][name] = entry
            server_log = log_dir / f"{stem}-{name}.log"
            try:
                log(f"{name}: starting (log {server_log}) ...")
                sb.start_server(srv, server_log, marker, sb.SERVER_START_TIMEOUT_S)
                entry["startup_s"] = round(srv.startup_s or 0.0, 1)
                log(f"{name}: ready in {entry['startup_s']:.0f}s")
                sb.preflight(srv)
                for c in args.concurrency:
                    runs = []
                    for i in range(1, args.repeats + 1):
                        sb.check_alive(srv, server_log)
                        r = sb.run_client(srv, client, c, args.model, raw_dir, log_dir, stem, i)
                        runs.append(r)
                        log(f"{name}: concurrency {c}, run {i}: {sb._fmt(r['output_throughput'])} tok/s, p50 TTFT "
                            f"{sb._fmt(r['p50_ttft_ms'])} ms, p50 TPOT {sb._fmt(r['p50_tpot_ms'])} ms (1-min load "
                            f"before: {r['load_avg_1m_before']})")
                    entry["results"][str(c)] = sb.summarize_runs(runs)
            except (RuntimeError, TimeoutError, OSError) as err:
                entry["error"] = str(err)
                log(f"{name}: error: {err}")
            except KeyboardInterrupt:
                entry["error"] = "interrupted"
                break
            finally:
                sb.stop_server(srv, marker)
                if srv.memory is not None:
                    entry["memory"] = srv.memory.result()
    sb.kill_marked(marker)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary, args.concurrency)
    log(f"wrote {out / f'{stem}.json'}")
    return 0 if all(v["error"] is None for v in summary["variants"].values()) else 1


def print_table(summary: dict[str, Any], concurrencies: list[int]) -> None:
    m = summary["machine"]
    print(f"\n{m['cpu_model']}, {m['nproc']} cores; model {summary['model']}; "
          f"{summary['workload']['input_len']} in / {summary['workload']['output_len']} out")
    base = summary["variants"].get("tp1", {}).get("results", {})
    print(f"{'variant':<15} {'conc':>4} {'tok/s':>8} {'vs tp1':>7} {'p50 TTFT ms':>12} {'p50 TPOT ms':>12}")
    for name, v in summary["variants"].items():
        for c in concurrencies:
            r = v["results"].get(str(c))
            if r is None:
                print(f"{name:<15} {c:>4} {'-':>8}  {v.get('error') or ''}"[:200])
                continue
            ref = (base.get(str(c)) or {}).get("output_throughput")
            ratio = sb._ratio(r["output_throughput"], ref)
            print(f"{name:<15} {c:>4} {sb._fmt(r['output_throughput']):>8} {sb._fmt(ratio, '.2f'):>7} "
                  f"{sb._fmt(r['p50_ttft_ms']):>12} {sb._fmt(r['p50_tpot_ms']):>12}")


if __name__ == "__main__":
    sys.exit(main())
