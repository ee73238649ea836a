"""Prefix-aware routing on this machine: one model, two vLLM replicas, requests that share long prefixes (a
document each, a different question after it, as RAG and few-shot traffic does), routed by ``power_of_two`` and then
by ``prefix_affinity``, in one run.

    python benchmarks/routing_bench.py                          # 12 documents x 4 questions, concurrency 1 and 4
    python benchmarks/routing_bench.py --docs 16 --doc-tokens 480 --kv-blocks 96 --concurrency 1,8

Each variant starts as a user would (``homefire serve CONFIG``: the ``demo`` model, ``replicas: 2``, the variant's
``routing``), with each replica's KV cache sized to hold about half the documents (``--kv-blocks`` blocks of 32
tokens: a replica that sees every document evicts; one that sees half keeps them). Figures per variant and
concurrency, from the replicas' own vLLM counters (``GET /v1/status``, per replica) and the client:

* prefix-cache hit rate: prompt tokens vLLM found cached / prompt tokens, and the ideal (every earlier request's
  prefix kept by one endless cache);
* p50 time to first token, requests/s and the split of documents between the replicas.

Writes ``OUT/routing_bench[-LABEL].json``, prints a table. :func:`documents`, :func:`prompts`,
:func:`prefix_counters` and :func:`ideal_hits` are also the workload of ``tests/integration/test_routing.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # noqa: E402  (benchmarks/ is scripts, not a package)

VARIANTS = ("power_of_two", "prefix_affinity")
BLOCK = 32  # vLLM's KV block on CPU here (its CPU attention takes multiples of 32)
WORDS = "alpha bravo cedar delta ember fjord gamma harbor iris juniper kelp lumen mosaic nectar onyx prism quartz " \
        "raven sierra tundra umber violet willow xenon yarrow zephyr amber basalt cobalt dune".split()


def log(msg: str) -> None:
    print(f"[routing_bench {datetime.now():%H:%M:%S}] {msg}", flush=True)


def documents(n: int, tokens: int, count_tokens: Callable[[str], int], seed: int = 0) -> list[str]:
    """``n`` documents of random words, each at least ``tokens`` tokens long, none sharing a first word block."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [f"Document {i}:"]
        while count_tokens(" ".join(words)) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(8))
        out.append(" ".join(words) + "\n")
    return out


def prompts(docs: list[str], rounds: int, seed: int = 0) -> list[tuple[int, str]]:
    """(document index, prompt) for every document and round: the document then a question of that round; the
    rounds in order, the documents shuffled within each (every document's first request precedes its others)."""
    rng = random.Random(seed)
    out = []
    for r in range(rounds):
        order = list(range(len(docs)))
        rng.shuffle(order)
        out += [(d, f"{docs[d]}Question {r}: what is word {r + 3}?") for d in order]
    return out


def ideal_hits(token_lists: list[list[int]], block: int = BLOCK) -> int:
    """Prompt tokens an endless prefix cache would hold for these prompts sent in order: each prompt's longest
    common prefix with any earlier one, in whole blocks, less the last token (vLLM always computes it)."""
    hits = 0
    for i, ids in enumerate(token_lists):
        best = 0
        for prev in token_lists[:i]:
            n = 0
            for a, b in zip(ids, prev):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        hits += min(best, len(ids) - 1) // block * block
    return hits


def prefix_counters(status: dict[str, Any], model: str) -> dict[str, tuple[int, int]]:
    """{replica: (prefix-cache queries, hits)} of ``model``'s replicas in a ``GET /v1/status`` answer."""
    (dep,) = [d for d in status["deployments"].values() if d.get("model") == model]
    return {r["replica"]: (r.get("prefix_cache_queries", 0), r.get("prefix_cache_hits", 0)) for r in dep.get("replicas", [])}


def counters_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {r: (q - before.get(r, (0, 0))[0], h - before.get(r, (0, 0))[1]) for r, (q, h) in after.items()}


def wait_for_counters(get_status: Callable[[], dict[str, Any]], model: str, queries: int, timeout_s: float = 30.0):
    """The replicas' counters once they add up to at least ``queries`` prompt tokens (Serve polls the replicas'
    stats every few seconds, so /v1/status lags)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counters = prefix_counters(get_status(), model)
        if sum(q for q, _ in counters.values()) >= queries or time.monotonic() > deadline:
            return counters
        time.sleep(0.25)


def stream_ttft(base_url: str, model: str, prompt: str, max_tokens: int = 4, api_key: str = "unused") -> float:
    """Seconds to the first streamed text of one completion (the request runs to its end)."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0, first = time.perf_counter(), None
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {api_key}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    return first if first is not None else float("nan")


def run_workload(base_url: str, model: str, items: list[tuple[int, str]], concurrency: int) -> list[float]:
    """TTFTs of ``items`` sent with ``concurrency`` in flight (1: one after another, in order)."""
    if concurrency == 1:
        return [stream_ttft(base_url, model, p) for _, p in items]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda it: stream_ttft(base_url, model, it[1]), items))


def variant_config(routing: str, model_path: str, kv_blocks: int, max_model_len: int = 1024) -> str:
    return (
        f"# routing_bench.py: routing {routing}\n"
        f"models:\n  - name: {sb.SERVED_NAME}\n    source: {model_path}\n    engine: vllm\n"
        f"    replicas: 2\n    cpus: 0.5\n    max_model_len: {max_model_len}\n    max_loras: 0\n    routing: {routing}\n"
        f"    engine_args: {{block_size: {BLOCK}, num_gpu_blocks_override: {kv_blocks}, enable_prefix_caching: true}}\n"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="routing_bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__)
    p.add_argument("--variants", type=sb.csv_choices(VARIANTS, "variant"),
                   default=list(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (default: both)")
    p.add_argument("--docs", type=int, default=12, help="documents (shared prefixes), default 12")
    p.add_argument("--rounds", type=int, default=4, help="questions per document, default 4")
    p.add_argument("--doc-tokens", type=int, default=320, help="tokens per document, default 320 (10 blocks)")
    p.add_argument("--kv-blocks", type=int, default=72,
                   help="KV-cache blocks per replica (32 tokens each), default 72: about half the documents")
    p.add_argument("--concurrency", type=sb._csv_ints, default=[1, 4], help="requests in flight (1,4)")
    p.add_argument("--model", default=None, help="model directory (default: the offline demo model)")
    p.add_argument("--max-model-len", type=int, default=1024, help="the model's context in the config (1024)")
    p.add_argument("--label", default=None, help="goes into the output file name")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p


def measure(base_url: str, model: str, items: list[tuple[int, str]], token_lists: list[list[int]],
            concurrency: int, round_size: int) -> dict[str, Any]:
    """One pass of ``items`` (their token ids ``token_lists``) through ``model``'s replicas: prompt tokens, the
    replicas' prefix-cache queries and hits over the pass (each replica's and in all), the ideal, and p50 TTFT of
    the first round (``round_size`` requests) and of the later ones."""
    import httpx

    status = lambda: httpx.get(f"{base_url}/v1/status", timeout=10).json()  # noqa: E731
    before = prefix_counters(status(), model)
    t0 = time.perf_counter()
    ttfts = run_workload(base_url, model, items, concurrency)
    wall = time.perf_counter() - t0
    queries = sum(len(t) for t in token_lists)
    after = wait_for_counters(status, model, sum(q for q, _ in before.values()) + queries)
    delta = counters_delta(before, after)
    q, h, ideal = sum(v[0] for v in delta.values()), sum(v[1] for v in delta.values()), ideal_hits(token_lists)
    first, later = ttfts[:round_size], ttfts[round_size:]
    return {
        "requests": len(items), "prompt_tokens": queries, "prefix_queries": q, "prefix_hits": h, "ideal_hits": ideal,
        "hit_rate": round(h / q, 4) if q else None, "ideal_hit_rate": round(ideal / queries, 4),
        "per_replica": {r: {"queries": a, "hits": b} for r, (a, b) in delta.items()},
        "p50_ttft_ms": round(1000 * statistics.median(ttfts), 2),
        "p50_ttft_first_round_ms": round(1000 * statistics.median(first), 2),
        "p50_ttft_later_rounds_ms": round(1000 * statistics.median(later), 2) if later else None,
        "requests_per_s": round(len(items) / wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer

    if args.model is None:
        from homefire.models.build import ensure_model

        args.model = str(ensure_model("demo").path)
    tok = AutoTokenizer.from_pretrained(args.model)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stem = "routing_bench" + (f"-{args.label}" if args.label else "")
    summary: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": sb.machine_info(),
        "versions": sb.versions(), "model": args.model,
        "workload": {"docs": args.docs, "rounds": args.rounds, "doc_tokens": args.doc_tokens, "block": BLOCK,
                     "kv_blocks_per_replica": args.kv_blocks, "max_tokens": 4, "concurrency": args.concurrency},
        "variants": {},
    }
    marker = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="routing-bench-") as tmp:
        for name in args.variants:
            cfg = Path(tmp) / f"{name}.yaml"
            cfg.write_text(variant_config(name, args.model, args.kv_blocks, args.max_model_len))
            port = sb._free_port()
            env = {"HOMEFIRE_ROUTING_STATS_PERIOD_S": "0.5"}
            srv = sb.Server(name, [sys.executable, "-m", "homefire.cli", "serve", str(cfg), "--port", str(port)], env,
                            ["/ready", "/v1/models"], port)
            entry: dict[str, Any] = {"config": cfg.read_text(), "error": None, "results": {}}
            summary["variants"][name] = entry
            server_log = out / "logs" / f"{stem}-{name}.log"
            try:
                log(f"{name}: starting (log {server_log}) ...")
                sb.start_server(srv, server_log, marker, sb.SERVER_START_TIMEOUT_S)
                log(f"{name}: ready in {srv.startup_s or 0:.0f}s")
                for i, c in enumerate(args.concurrency):
                    # A fresh set of documents per concurrency: each pass starts from caches that have not seen it.
                    pass_docs = documents(args.docs, args.doc_tokens, lambda s: len(tok.encode(s)), seed=i + 1)
                    items = prompts(pass_docs, args.rounds, seed=i)
                    token_lists = [tok.encode(p) for _, p in items]
                    r = entry["results"][str(c)] = measure(srv.base_url, sb.SERVED_NAME, items, token_lists, c,
                                                           args.docs)
                    log(f"{name}: concurrency {c}: hit rate {r['hit_rate']} (ideal {r['ideal_hit_rate']}), p50 TTFT "
                        f"{r['p50_ttft_ms']} ms (later rounds {r['p50_ttft_later_rounds_ms']} ms), "
                        f"{r['requests_per_s']} req/s, per replica {r['per_replica']}")
            except (RuntimeError, TimeoutError, OSError) as err:
                entry["error"] = str(err)
                log(f"{name}: error: {err}")
            finally:
                sb.stop_server(srv, marker)
    sb.kill_marked(marker)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary, args.concurrency)
    log(f"wrote {out / f'{stem}.json'}")
    return 0


def print_table(summary: dict[str, Any], concurrencies: list[int]) -> None:
    print(f"\n{'routing':<16} {'conc':>4} {'hit rate':>9} {'ideal':>6} {'p50 TTFT ms':>12} {'later':>8} {'req/s':>7}")
    for name, entry in summary["variants"].items():
        for c in concurrencies:
            r = entry["results"].get(str(c))
            if r is None:
                print(f"{name:<16} {c:>4}  error: {entry['error']}")
                continue
            print(f"{name:<16} {c:>4} {r['hit_rate']!s:>9} {r['ideal_hit_rate']!s:>6} {r['p50_ttft_ms']:>12} "
                  f"{r['p50_ttft_later_rounds_ms']!s:>8} {r['requests_per_s']:>7}")
    rows = summary["variants"]
    if all(v in rows for v in VARIANTS):
        for c in concurrencies:
            a, b = rows["prefix_affinity"]["results"].get(str(c)), rows["power_of_two"]["results"].get(str(c))
            if a and b and b["p50_ttft_later_rounds_ms"]:
                print(f"concurrency {c}: prefix_affinity / power_of_two p50 TTFT (later rounds) "
                      f"{a['p50_ttft_later_rounds_ms'] / b['p50_ttft_later_rounds_ms']:.2f}, hit rate "
                      f"{a['hit_rate']} vs {b['hit_rate']}")


if __name__ == "__main__":
    raise SystemExit(main())
