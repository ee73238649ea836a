"""benchmarks/serve_bench.py's pure helpers: repeats summary, spread, ratios, targets, probe parsing, Serve config.
No servers are started."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"


@pytest.fixture(scope="module")
def sb():
    spec = importlib.util.spec_from_file_location("serve_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_bench"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("serve_bench", None)


def _run(sb, tok_s: float, ttft: float, failed: int = 0) -> dict:
    r = {k: 1.0 for k in sb.METRICS}
    r.update(completed=8 - failed, failed=failed, output_throughput=tok_s, p50_ttft_ms=ttft, load_avg_1m_before=1.5)
    return r


def test_summarize_runs_median_min_max_and_totals(sb):
    s = sb.summarize_runs([_run(sb, 900, 10), _run(sb, 941, 12, failed=1), _run(sb, 925, 11)])
    assert s["output_throughput"] == 925 and s["min"]["output_throughput"] == 900
    assert s["max"]["output_throughput"] == 941 and s["p50_ttft_ms"] == 11
    assert s["repeats"] == 3 and len(s["runs"]) == 3
    assert s["completed_total"] == 23 and s["failed_total"] == 1
    assert set(sb.METRICS) <= set(s)  # readers of a single run's keys still find them


def test_summarize_runs_tolerates_missing_metric(sb):
    runs = [_run(sb, 900, 10), _run(sb, 910, 10)]
    runs[0]["request_goodput"] = None
    s = sb.summarize_runs(runs)
    assert s["request_goodput"] == 1.0 and s["min"]["request_goodput"] == 1.0


def test_spread_formats(sb):
    r = sb.summarize_runs([_run(sb, 903, 10), _run(sb, 941, 10), _run(sb, 925, 10)])
    assert sb.fmt_spread(r, "output_throughput") == "925.0 ±2%"
    assert sb.fmt_spread(sb.summarize_runs([_run(sb, 925, 10)]), "output_throughput") == "925.0"
    assert sb.spread_pct(100.0, 90.0, 104.0) == pytest.approx(10.0)
    assert sb.spread_pct(None, 1.0, 2.0) is None
    assert sb.fmt_range(0.97, 0.93, 1.01) == "0.97 [0.93-1.01]"
    assert sb.fmt_range(0.97, None, None) == "0.97" and sb.fmt_range(None, 1, 2) == "-"


def test_percentile_linear(sb):
    assert sb.percentile([], 50) is None
    assert sb.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert sb.percentile(list(range(11)), 90) == pytest.approx(9.0)
    assert sb.percentile([1.0, 2.0], 50) == pytest.approx(1.5)


def test_sse_text(sb):
    assert sb.sse_text(b'data: {"choices": [{"text": "Hi"}]}\n') == "Hi"
    assert sb.sse_text(b'data: {"choices": [{"text": ""}]}\n') == ""
    assert sb.sse_text(b"data: [DONE]\n") is None
    assert sb.sse_text(b'data: {"choices": [], "usage": {"completion_tokens": 4}}\n') is None
    assert sb.sse_text(b"\n") is None and sb.sse_text(b": ping\n") is None and sb.sse_text(b"data: {bad\n") is None


def test_serve_run_config_is_a_serve_config(sb):
    cfg = yaml.safe_load(sb.serve_run_config("/models/demo dir", 8123))
    assert cfg["http_options"] == {"host": "127.0.0.1", "port": 8123}
    (app,) = cfg["applications"]
    assert app["import_path"] == "homefire.serve:build_app" and app["route_prefix"] == "/"
    assert app["args"]["models"] == [{"name": "demo", "source": "/models/demo dir", "engine": "vllm", "cpus": 1,
                                      "max_model_len": 1024, "max_loras": 0}]


def test_servers_and_run_order(sb):
    assert sb.SERVERS == ("homefire", "serve-run", "vllm", "naive")
    assert sb._csv_servers("homefire,serve-run,vllm") == ["homefire", "serve-run", "vllm"]
    args = sb.build_parser().parse_args([])
    assert args.servers == list(sb.SERVERS) and args.ttft_probes == 33 and args.repeats is None


def _servers(sb) -> dict:
    def point(tok_s, ttft):
        return sb.summarize_runs([_run(sb, tok_s * 0.98, ttft), _run(sb, tok_s, ttft), _run(sb, tok_s * 1.02, ttft)])

    return {
        "homefire": {"results": {"1": point(95, 30), "32": point(960, 200)}, "ttft_probe": {"p50_ms": 23.0}},
        "serve-run": {"results": {"1": point(80, 35), "32": point(900, 260)}, "ttft_probe": {"p50_ms": 30.0}},
        "vllm": {"results": {"1": point(100, 20), "32": point(1000, 180)}, "ttft_probe": {"p50_ms": 20.0}},
        "naive": {"results": {"1": point(20, 50), "32": point(50, 900)}},
    }


def test_ratios_at_every_concurrency(sb):
    r = sb.compute_ratios(_servers(sb), [1, 32])
    assert set(r["output_tok_s"]) == {"homefire", "serve-run", "naive"}
    hf32 = r["output_tok_s"]["homefire"]["32"]
    assert hf32["value"] == pytest.approx(0.96)
    assert hf32["min"] == pytest.approx(0.96 * 0.98 / 1.02) and hf32["max"] == pytest.approx(0.96 * 1.02 / 0.98)
    assert r["output_tok_s"]["serve-run"]["1"]["value"] == pytest.approx(0.8)
    assert r["p50_ttft_probe_minus_vllm_ms"] == {"homefire": 3.0, "serve-run": 10.0, "naive": None}


def test_targets(sb):
    t = sb.evaluate_targets(_servers(sb), [1, 32])
    assert t["homefire_vs_vllm_output_tok_s"]["pass"] is True
    assert t["serve_run_vs_vllm_output_tok_s"]["value"] == pytest.approx(0.9)
    assert t["serve_run_vs_vllm_output_tok_s"]["pass"] is False
    assert t["homefire_vs_naive_output_tok_s"]["pass"] is True
    ttft = t["homefire_minus_vllm_p50_ttft_ms"]
    assert ttft["source"] == "ttft_probe" and ttft["value"] == 3.0 and ttft["pass"] is True
    assert ttft["by_concurrency"] == {"1": 10.0, "32": 20.0}  # the client's, kept for comparison


def test_targets_without_probe_or_32_streams(sb):
    servers = _servers(sb)
    for s in servers.values():
        s.pop("ttft_probe", None)
        s["results"].pop("32")
    t = sb.evaluate_targets(servers, [1])
    assert t["homefire_minus_vllm_p50_ttft_ms"]["source"] == "client"
    assert t["homefire_minus_vllm_p50_ttft_ms"]["value"] == 10.0
    assert t["homefire_vs_vllm_output_tok_s"]["concurrency"] == 1 and t["homefire_vs_vllm_output_tok_s"]["note"]
    alone = sb.evaluate_targets({"vllm": servers["vllm"]}, [1])
    assert alone["serve_run_vs_vllm_output_tok_s"]["pass"] is None
    ttft = alone["homefire_minus_vllm_p50_ttft_ms"]
    assert ttft["pass"] is None and ttft["note"] is None and ttft["source"] is None


def test_report_and_plot(sb, tmp_path, capsys):
    servers = _servers(sb)
    servers["homefire"]["memory"] = {"peak_rss_mib": 2048.0, "peak_processes": 12}
    servers["homefire"]["ttft_probe"].update(p90_ms=25.0, ok=33, requests=33)
    summary = {
        "label": "t", "machine": {"cpu_model": "cpu", "nproc": 2}, "versions": {"vllm": "x", "ray": "y"},
        "workload": {"concurrency": [1, 32], "repeats": 3, "num_prompts": 8, "input_len": 64, "output_len": 64,
                     "goodput_slo_ms": {"ttft": 500.0, "tpot": 100.0}},
        "servers": servers,
    }
    summary["ratios"] = sb.compute_ratios(servers, [1, 32])
    summary["targets"] = sb.evaluate_targets(servers, [1, 32])
    json.dumps(summary)
    sb.print_report(summary)
    out = capsys.readouterr().out
    assert "serve run / bare vLLM, output tok/s" in out and "±2%" in out and "0.96 [" in out
    assert "2048" in out
    sb.plot(summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_memory_sampler_counts_this_process_tree(sb):
    import os
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        m = sb.MemorySampler(os.getpid(), "no-such-marker")
        assert m.sample() > 0
        res = m.result()
        assert res["peak_processes"] >= 2 and res["peak_rss_mib"] > 1 and res["marked_outside_tree_max"] == 0
    finally:
        child.kill()
        child.wait()
