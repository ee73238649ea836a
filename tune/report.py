"""The answer of a sweep: a table, a Pareto plot, the winner under the user's constraint, and a serve config for it.

Writes into the experiment directory: ``report.json`` (every row, ratios to the original, the winner per workload),
``report.md`` (the same as a table), ``pareto.png`` (perplexity increase vs speedup, size as marker area) and
``serve.yaml`` (a Serve config that serves the winner through its engine under the original's name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from homefire.tune.config import TuneConfig
from homefire.tune.trial import ORIGINAL


def summarize(cfg: TuneConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the original and the winner for each measured concurrency (the configured one is `best`)."""
    ref = next((r for r in rows if r.get("variant") == ORIGINAL and r.get("status") == "ok"), None)
    if ref is None:
        return {"rows": rows, "best": None, "why": "the original model could not be measured; see its row"}
    out = []
    for r in rows:
        r = dict(r)
        if r.get("status") == "ok":
            r["ppl_increase"] = r["perplexity"] / ref["perplexity"] - 1
            r["size_mb"] = r["size_bytes"] / 1e6
            for c in cfg.speed.concurrency:
                r[f"c{c}_speedup"] = r[f"c{c}_output_tok_s"] / ref[f"c{c}_output_tok_s"]
        out.append(r)
    best_by = {c: _best(cfg, out, c) for c in cfg.speed.concurrency}
    best = best_by[cfg.select.concurrency]
    why = None if best else (
        f"no variant is within max_ppl_increase {cfg.select.max_ppl_increase}"
        + (f", min_speedup {cfg.select.min_speedup}" if cfg.select.min_speedup else "")
        + (f", max_size_mb {cfg.select.max_size_mb}" if cfg.select.max_size_mb else "")
    )
    return {"rows": out, "reference": ref["variant"], "best": best, "best_by_concurrency": best_by, "why": why,
            "select": cfg.select.model_dump()}


def _best(cfg: TuneConfig, rows: list[dict[str, Any]], c: int) -> str | None:
    s = cfg.select
    ok = [
        r for r in rows
        if r.get("status") == "ok" and r["variant"] != ORIGINAL and not r.get("quality_only")
        and r["ppl_increase"] <= s.max_ppl_increase
        and (s.min_speedup is None or r[f"c{c}_speedup"] >= s.min_speedup)
        and (s.max_size_mb is None or r["size_mb"] <= s.max_size_mb)
    ]
    return max(ok, key=lambda r: r[f"c{c}_output_tok_s"])["variant"] if ok else None


def serve_config(cfg: TuneConfig, summary: dict[str, Any], served_name: str) -> str | None:
    """A Serve config (YAML text) serving the winner under ``served_name``; None without a winner."""
    best = summary["best"]
    if best is None:
        return None
    row = next(r for r in summary["rows"] if r["variant"] == best)
    c = cfg.select.concurrency
    extra = {"onnx": f"\n          max_concurrency: {c}", "llamacpp": f"\n          slots: {min(c, 64)}"}.get(row["engine"], "")
    if best.endswith("+kv-fp8"):
        extra += "\n          engine_args: {kv_cache_dtype: fp8}"
    return f"""# Written by `homefire tune` ({cfg.name}): {best} of {row['entry']} won for {c} stream(s) --
# perplexity {row['ppl_increase']:+.2%} vs the original, {row[f'c{c}_speedup']:.2f}x its decode speed on fp32 transformers.
# Run it with:   homefire serve {{this file}}     (or: serve run {{this file}})
http_options:
  host: 127.0.0.1
  port: 8000
applications:
  - name: homefire
    route_prefix: /
    import_path: homefire.serve:build_app
    args:
      models:
        - name: {served_name}
          source: {row['entry']}
          engine: {row['engine']}
          cpus: 1{extra}
"""


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(cfg: TuneConfig, summary: dict[str, Any]) -> str:
    cs = cfg.speed.concurrency
    head = ["variant", "engine", "status", "perplexity", "Δ ppl", "KL", "top-1", "task", "size MB"] + [
        x for c in cs for x in (f"tok/s c={c}", f"speedup c={c}", f"TTFT ms c={c}")] + ["peak mem MB"]
    lines = [f"# homefire tune: {cfg.name}", "", f"Model `{cfg.model.source}`; reference: the original on fp32 "
             "transformers. Perplexity on held-out text, scored by the engine that serves each variant; KL = "
             "KL(variant ‖ original) per token over the variant's top-20 next tokens plus the rest as one bucket (a "
             "lower bound); top-1 = share of positions where variant and original rank the same token first; task = "
             f"share of `{cfg.eval.task}` answered ({cfg.eval.task_match} match), greedy, on the variant's engine.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref_ppl = next((r["perplexity"] for r in summary["rows"] if r.get("variant") == ORIGINAL and r.get("status") == "ok"),
                   float("nan"))
    for r in summary["rows"]:
        if r.get("status") == "stopped" and r.get("perplexity") is not None:
            lines.append(f"| {r['variant']} | {r.get('engine', '')} | stopped by ASHA (speed not measured) | "
                         f"{r['perplexity']:.2f} | {r['perplexity'] / ref_ppl - 1:+.2%} |" + " |" * (len(head) - 5))
            continue
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | | {r.get('status')}: {r.get('reason') or r.get('error', '')} |"
                         + " |" * (len(head) - 3))
            continue
        cells = [r["variant"] + (" †" if r.get("quality_only") else ""), r["engine"], "ok", _fmt(r["perplexity"], ".2f"),
                 _fmt(r.get("ppl_increase"), "+.2%"), _fmt(r.get("kl_to_original"), ".2g"),
                 _fmt(r.get("top1_agreement"), ".1%"), _fmt(r.get("task_score"), ".1%"), _fmt(r.get("size_mb"), ".1f")]
        for c in cs:
            cells += [_fmt(r[f"c{c}_output_tok_s"], ".0f"), _fmt(r.get(f"c{c}_speedup"), ".2f"),
                      _fmt(r[f"c{c}_p50_ttft_ms"], ".0f")]
        cells.append(_fmt(r["peak_memory_bytes"] / 1e6, ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if summary["best"]:
        lines.append(f"**Best for {cfg.select.concurrency} stream(s): {summary['best']}** (within "
                     f"max_ppl_increase {cfg.select.max_ppl_increase:.0%}); serve it with `homefire serve serve.yaml`.")
    else:
        lines.append(f"**No winner**: {summary['why']}.")
    for c, v in summary.get("best_by_concurrency", {}).items():
        lines.append(f"- {c} stream(s): {v or 'none within the bounds'}")
    lines.append("")
    lines.append("† Sparse (unstructured / 2:4) pruning is quality-only: no CPU engine here (vLLM CPU, ONNX Runtime, "
                 "llama.cpp) runs sparse weights faster than dense ones, so these rows show the quality a sparse kernel "
                 "would keep; their speed is the dense model's, and they are never chosen as the winner.")
    return "\n".join(lines) + "\n"


def pareto_plot(cfg: TuneConfig, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cfg.select.concurrency
    rows = [r for r in summary["rows"] if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r[f"c{c}_speedup"], r["ppl_increase"] * 100, s=30 + 400 * r["size_mb"] / max(x["size_mb"] for x in rows),
                   alpha=0.6, edgecolors="k", color="tab:red" if r["variant"] == summary["best"] else "tab:blue")
        ax.annotate(r["variant"], (r[f"c{c}_speedup"], r["ppl_increase"] * 100), fontsize=8,
                    xytext=(5, 5), textcoords="offset points")
    ax.axhline(cfg.select.max_ppl_increase * 100, ls="--", color="gray", lw=1, label="max perplexity increase")
    ax.set_xlabel(f"decode speedup over fp32 transformers ({c} stream{'s' * (c > 1)})")
    ax.set_ylabel("perplexity increase (%)")
    ax.set_title(f"homefire tune {cfg.name}: quality vs speed (marker area = size on disk)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(cfg: TuneConfig, rows: list[dict[str, Any]], out_dir: Path, served_name: str) -> dict[str, Any]:
    """Write report.json / report.md / pareto.png / serve.yaml into ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(cfg, rows)
    text = serve_config(cfg, summary, served_name)
    if text is not None:
        (out_dir / "serve.yaml").write_text(text.replace("{this file}", str(out_dir / "serve.yaml")))
        summary["serve_config"] = str(out_dir / "serve.yaml")
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    (out_dir / "report.md").write_text(markdown(cfg, summary))
    if any(r.get("status") == "ok" for r in summary["rows"]) and "ppl_increase" in next(
        (r for r in summary["rows"] if r.get("status") == "ok"), {}
    ):
        pareto_plot(cfg, summary, out_dir / "pareto.png")
    return summary
