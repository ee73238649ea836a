"""One trial: make a variant, start the engine that would serve it, measure quality, speed, memory and size.

The variant ``original`` is the unmodified model on fp32 transformers: the reference every other trial's
perplexity increase and speedup are computed against (in the report, once all trials are in). Every other variant
is a ``homefire models convert`` target (a format, a pruning, or a pruning then a format: ``prune-mlp-25+gguf-q4_0``),
measured on its own engine (vLLM, ONNX Runtime, llama.cpp) in-process: perplexity and the top tokens at every
position through ``engine.score`` on the same token windows, greedy decode with end-of-text ignored at each
configured concurrency. After the engine is gone (outside the peak-memory window), the original model scores the
same windows on transformers: KL(variant || original) over the variant's top tokens plus the rest as one bucket (a
lower bound of the full divergence, exact when the top tokens hold all the mass) and the share of positions where
both rank the same token first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError
from homefire.tune.config import TuneConfig

logger = logging.getLogger(__name__)

ORIGINAL = "original"
#: The last step of a vLLM-served variant that runs it with an fp8 KV cache (``vllm-w8a8+kv-fp8``; alone: the model).
KV_FP8 = "kv-fp8"
#: Every variant's greedy continuation of this prompt is kept with its numbers: what a served variant must answer.
GREEDY_PROMPT = "The river that runs through the town"
GREEDY_TOKENS = 16


class PeakMemory:
    """Peak resident memory of this process and its children (engines run cores in child processes)."""

    def __init__(self, interval_s: float = 0.1):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a child that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self._interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Non-overlapping windows of ``size`` tokens (the last one dropped when shorter than 2 tokens)."""
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) >= 2]


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def _size_bytes(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _prompts(ids: list[int], n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens cut from the held-out ids (wrapping around)."""
    out = []
    for i in range(n):
        start = (i * 37) % max(len(ids) - length, 1)
        prompt = (ids * (1 + length // max(len(ids), 1) + 1))[start:start + length]
        out.append(prompt)
    return out


# -- the reference: fp32 transformers ---------------------------------------------------------------------------


def reference_model(cfg: TuneConfig, path: str):
    """The unmodified model on transformers: fp32 on CPU; bf16 on the trial's GPU when it has one."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = cfg.gpus_per_trial > 0 and torch.cuda.is_available()
    torch.set_num_threads(max(1, int(cfg.cpus_per_trial)))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    return model.to("cuda" if cuda else "cpu").eval()


def _measure_original(cfg: TuneConfig, path: str) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    ids = tok.encode(cfg.eval_text(), add_special_tokens=False)[: cfg.eval.max_tokens]
    model = reference_model(cfg, path)
    dev = model.device
    logprobs: list[float] = []
    with torch.no_grad():
        for w in windows(ids, cfg.eval.window):
            lp = torch.log_softmax(model(torch.tensor([w], device=dev)).logits[0, :-1].double(), dim=-1).cpu()
            logprobs += lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].tolist()
    task = None
    if cfg.eval.task:
        from homefire import evaluation
        from homefire.train.evaluate import transformers_generate

        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        task = evaluation.score(evaluation.load_task(cfg.eval.task),
                                transformers_generate(model, tok, cfg.eval.task_max_tokens, dev), cfg.eval.task_match)
    speed = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    for c in cfg.speed.concurrency:
        # transformers has no continuous batching: c streams are one padded batch of c prompts at a time.
        prompts = _prompts(ids, max(cfg.speed.prompts, c), cfg.speed.input_len)
        out_tokens, ttfts, started = 0, [], time.perf_counter()
        for i in range(0, len(prompts), c):
            batch = torch.tensor(prompts[i:i + c], device=dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=1, min_new_tokens=1,
                               do_sample=False, pad_token_id=pad)
                ttfts.append(time.perf_counter() - t0)
                model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=cfg.speed.output_len,
                               min_new_tokens=cfg.speed.output_len, do_sample=False, pad_token_id=pad)
            out_tokens += batch.shape[0] * cfg.speed.output_len
        wall = time.perf_counter() - started - sum(ttfts)
        speed[f"c{c}"] = {"output_tok_s": out_tokens / wall, "p50_ttft_ms": sorted(ttfts)[len(ttfts) // 2] * 1e3}
    return {"engine": "transformers", "format": "hf" if dev.type == "cpu" else "hf-bf16-cuda", "scored_tokens": len(logprobs),
            "perplexity": perplexity(logprobs), "logprobs_sum": sum(logprobs), "speed": speed, **_task_fields(task)}


def _task_fields(task: dict[str, Any] | None) -> dict[str, Any]:
    if task is None:
        return {}
    return {"task_score": task["score"], "task_n": task["n"], "task_sample": task["samples"][0]["answer"]}


# -- a converted variant on its engine ----------------------------------------------------------------------------


def _engine_settings(cfg: TuneConfig, engine: str, kv_fp8: bool = False) -> dict[str, Any]:
    most = max(cfg.speed.concurrency)
    length = max(cfg.eval.window, cfg.speed.input_len + cfg.speed.output_len) + 8
    settings: dict[str, Any] = {"cpus": cfg.cpus_per_trial, "max_model_len": length}
    if cfg.gpus_per_trial and engine != "llamacpp":  # homefire's llama.cpp build is the portable CPU one
        settings["gpus"] = min(cfg.gpus_per_trial, 1.0)
    if engine == "vllm" and not cfg.gpus_per_trial:
        settings.update(kv_cache_gb=1)
    elif engine == "onnx" and cfg.gpus_per_trial:
        settings.update(provider="cuda")
    if kv_fp8:  # vLLM's fp8 KV cache: half the cache memory, on CPU (head size a multiple of 32) and CUDA
        settings["engine_args"] = {"kv_cache_dtype": "fp8"}
    elif engine == "onnx":
        settings.update(max_concurrency=most)
    elif engine == "llamacpp":
        settings.update(slots=min(most, 64))
    return settings


async def _measure_engine(cfg: TuneConfig, entry, engine_kind: str,
                          on_quality: Callable[[dict[str, Any]], None] | None = None,
                          kv_fp8: bool = False) -> dict[str, Any]:
    from homefire.serve.config import model_config
    from homefire.serve.engines import MAX_SCORE_TOP_K, SamplingSpec, Scores, engine_class

    mc = model_config({"name": "tune", "source": entry.ref, "engine": engine_kind,
                       **_engine_settings(cfg, engine_kind, kv_fp8)})
    engine = engine_class(engine_kind)(mc, entry.path)
    started = time.perf_counter()
    await engine.start(timeout_s=600)
    startup_s = time.perf_counter() - started
    try:
        ids = engine.tokenizer.encode(cfg.eval_text())[: cfg.eval.max_tokens]
        scored = Scores([])
        for w in windows(ids, cfg.eval.window):
            scored.extend(await engine.score(w, top_k=MAX_SCORE_TOP_K))
        logprobs = scored.logprobs
        spec = SamplingSpec(max_tokens=cfg.speed.output_len, temperature=0, ignore_eos=True)

        async def one(rid: str, prompt: list[int], ttfts: list[float]) -> int:
            t0, n = time.perf_counter(), 0
            async for d in engine.generate(rid, prompt, spec):
                if n == 0 and d.num_tokens:
                    ttfts.append(time.perf_counter() - t0)
                n += d.num_tokens
            return n

        task = None
        if cfg.eval.task:
            from homefire import evaluation

            examples = evaluation.load_task(cfg.eval.task)
            answer_spec = SamplingSpec(max_tokens=cfg.eval.task_max_tokens, temperature=0)
            answers = []
            for i, ex in enumerate(examples):
                prompt = (engine.tokenizer.render_chat(ex.messages) if ex.messages is not None
                          else engine.tokenizer.encode(ex.prompt))
                answers.append("".join([d.text async for d in engine.generate(f"task-{i}", prompt, answer_spec)]))
            task = evaluation.score_answers(examples, answers, cfg.eval.task_match)
        if on_quality is not None:  # the quality rung: a scheduler (ASHA) may stop the trial before its speed is measured
            on_quality({"engine": engine_kind, "format": entry.format, "scored_tokens": len(logprobs),
                        "perplexity": perplexity(logprobs), **_task_fields(task)})
        greedy = SamplingSpec(max_tokens=GREEDY_TOKENS, temperature=0)
        sample = "".join([d.text async for d in engine.generate("greedy", engine.tokenizer.encode(GREEDY_PROMPT),
                                                                  greedy)])
        await one("warmup", _prompts(ids, 1, cfg.speed.input_len)[0], [])
        speed = {}
        for c in cfg.speed.concurrency:
            prompts = _prompts(ids, max(cfg.speed.prompts, c), cfg.speed.input_len)
            gate, ttfts = asyncio.Semaphore(c), []

            async def gated(i: int, p: list[int]) -> int:
                async with gate:
                    return await one(f"c{c}-{i}", p, ttfts)

            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*(gated(i, p) for i, p in enumerate(prompts))))
            wall = time.perf_counter() - t0
            speed[f"c{c}"] = {"output_tok_s": tokens / wall, "p50_ttft_ms": sorted(ttfts)[len(ttfts) // 2] * 1e3}
        return {"engine": engine_kind, "format": entry.format, "scored_tokens": len(logprobs),
                "perplexity": perplexity(logprobs), "logprobs_sum": sum(logprobs), "speed": speed,
                "startup_s": startup_s, "greedy_sample": sample, "_ids": ids, "_top": scored.top, **_task_fields(task)}
    finally:
        await engine.shutdown()


def compare_to_original(cfg: TuneConfig, path: str, ids: list[int], top: list[dict[int, float]]) -> dict[str, float]:
    """KL(variant || original) and top-1 agreement, from the variant's top tokens at each scored position (``top``,
    in the order of ``windows(ids, cfg.eval.window)``) and the original model's full distribution there."""
    import torch

    model = reference_model(cfg, path)
    kl, agree, n = 0.0, 0, 0
    positions = iter(top)
    with torch.no_grad():
        for w in windows(ids, cfg.eval.window):
            logp = torch.log_softmax(model(torch.tensor([w], device=model.device)).logits[0, :-1].double(), dim=-1).cpu()
            for row in logp:
                t = next(positions)
                tokens = [i for i in t if i < row.shape[0]]
                q = torch.tensor([t[i] for i in tokens], dtype=torch.float64)
                p = row[tokens]
                q_tail = max(1.0 - float(q.exp().sum()), 0.0)
                p_tail = max(1.0 - float(p.exp().sum()), 1e-12)
                kl += float((q.exp() * (q - p)).sum()) + (q_tail * math.log(q_tail / p_tail) if q_tail > 1e-12 else 0.0)
                agree += max(t, key=t.get) == int(row.argmax())
                n += 1
    return {"kl_to_original": kl / max(n, 1), "top1_agreement": agree / max(n, 1)}


def make_variant(cfg: TuneConfig, variant: str) -> tuple[Any, dict[str, Any]]:
    """The registry entry of ``variant`` of the sweep's model, and facts about how it was made: one conversion, or a
    chain (``prune-layers-25+distill+gguf-q4_0``: prune, distill from the original, quantize)."""
    from homefire.convert import convert

    entry, facts = None, {}
    for step in variant.split("+"):
        if step == KV_FP8:  # an engine setting, not a conversion
            continue
        if step == "distill":
            entry, facts["distill"] = distill(cfg, entry)
        else:
            entry = convert(entry.ref if entry is not None else cfg.model.source, step)
    if entry is None:  # kv-fp8 alone: the model itself, on vLLM with an fp8 KV cache
        from homefire.models.build import resolve_source

        _, entry = resolve_source(cfg.model.source)
        if entry is None:
            raise ConfigError(f"{variant}: the model must be a registry entry (not a directory) to serve it as is. "
                              "Fix: register it, or chain kv-fp8 after a conversion")
    return entry, facts


def distill(cfg: TuneConfig, student) -> tuple[Any, dict[str, Any]]:
    """Train ``student`` (a pruned entry) from the original's logits on Ray Train (``homefire distill``'s pipeline);
    the result is registered as ``<student>-distill``."""
    from homefire.models.build import resolve_source
    from homefire.registry import Registry
    from homefire.train.config import TrainConfig
    from homefire.train.trainer import run_training

    spec = cfg.space.distill_settings()
    tcfg = TrainConfig.model_validate({
        "model": {"source": student.ref, "trust_remote_code": cfg.model.trust_remote_code}, "method": "distill",
        "distill": {"teacher": cfg.model.source, "alpha": spec.alpha, "temperature": spec.temperature},
        "data": {"train": spec.data, "max_length": spec.max_length, "eval_fraction": 0.05},
        "optim": {"lr": spec.lr, "max_steps": spec.steps, "batch_size": spec.batch_size, "scheduler": "cosine",
                  "warmup_steps": max(1, spec.steps // 10)},
        "scaling": {"workers": spec.workers, "cpus_per_worker": spec.cpus_per_worker, "use_gpu": spec.use_gpu},
        "checkpoint": {"every_n_steps": spec.steps, "keep": 1},
        "eval": {"max_batches": 8},
        "output": {"name": f"{student.name}-distill"},
        "storage_path": str(Path(cfg.run_root).expanduser() / cfg.name / "distill"),
        "log_every_n_steps": max(1, spec.steps // 4),
    })
    # The same student distilled the same way from the same teacher is the same entry: chains reuse it.
    registry, (_, teacher) = Registry(), resolve_source(cfg.model.source)
    key = "distill-" + hashlib.sha256(json.dumps(
        [student.files, teacher.files if teacher else cfg.model.source, spec.model_dump()], sort_keys=True,
    ).encode()).hexdigest()[:16]
    done = registry.find_by_recipe(tcfg.output.name, key)
    if done is not None:
        m = done.metrics
        return registry.fetch(done), {"steps": m.get("steps"), "train_s": 0.0, "reused": True,
                                      "eval_ppl_before": m.get("eval_before", {}).get("perplexity"),
                                      "eval_ppl_after": m.get("eval_after", {}).get("perplexity")}
    t0 = time.perf_counter()
    report = run_training(tcfg, quiet=True, registry=registry, recipe_hash=key)
    if report.status != "finished" or not report.entry:
        raise RuntimeError(f"distillation of {student.ref} failed; see {report.run_dir}")
    return registry.get(report.entry), {
        "steps": report.steps, "train_s": round(time.perf_counter() - t0, 1), "run_dir": report.run_dir,
        "eval_ppl_before": report.eval_before.get("perplexity"), "eval_ppl_after": report.eval_after.get("perplexity"),
    }


def measure(cfg: TuneConfig, variant: str,
            on_quality: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every number of one trial (raises ConfigError when this machine cannot make or run ``variant``).

    ``on_quality`` gets the quality numbers of a converted variant before its speed is measured (ASHA's first rung).
    """
    from homefire.models.build import resolve_source

    path, original = resolve_source(cfg.model.source)
    with PeakMemory() as mem:
        if variant == ORIGINAL:
            row = _measure_original(cfg, path)
            row.update(entry=original.ref if original else path, size_bytes=_size_bytes(path))
        else:
            from homefire.registry import FORMAT_ENGINES

            t0 = time.perf_counter()
            entry, facts = make_variant(cfg, variant)
            convert_s = time.perf_counter() - t0
            row = asyncio.run(_measure_engine(cfg, entry, FORMAT_ENGINES[entry.format][0], on_quality,
                                              kv_fp8=variant.split("+")[-1] == KV_FP8))
            row.update({f"distill_{k}": v for k, v in facts.get("distill", {}).items()})
            row.update(entry=entry.ref, size_bytes=_size_bytes(entry.path), convert_s=convert_s,
                       quality_only=any(is_sparse(step) for step in variant.split("+") if step.startswith("prune-")))
    if variant == ORIGINAL:
        row.update(kl_to_original=0.0, top1_agreement=1.0)
    else:
        row.update(compare_to_original(cfg, path, row.pop("_ids"), row.pop("_top")))
    row.update(variant=variant, peak_memory_bytes=mem.peak_bytes, status="ok")
    return row


def is_sparse(step: str) -> bool:
    """Unstructured and 2:4 prunings keep every shape: no CPU engine runs them faster (quality-only)."""
    from homefire.convert import prune

    return not prune.parse(step).structured


def trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one report with every number, or a skipped row with the reason."""
    from ray import tune

    cfg = TuneConfig.model_validate(config["tune"])
    variant = config.get("variant") or cfg.space.variant_of(config)

    def quality(partial: dict[str, Any]) -> None:
        # speed not measured yet: NaN, so that a searcher reading this as the final result counts the point failed
        tune.report(_flat({**partial, "variant": variant, "status": "measuring",
                           **{f"c{c}_output_tok_s": float("nan") for c in cfg.speed.concurrency}}))

    try:
        row = measure(cfg, variant, quality if cfg.scheduler == "asha" else None)
    except ConfigError as err:  # this machine cannot make or run it: a result, not a crash
        # NaN objectives mark the point failed for Optuna, which then avoids it
        row = {"variant": variant, "status": "skipped", "reason": str(err), "perplexity": float("nan"),
               **{f"c{c}_output_tok_s": float("nan") for c in cfg.speed.concurrency}}
    tune.report(_flat(row))


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Tune flattens nested dicts with '/'; keep the row flat and explicit instead."""
    out = {k: v for k, v in row.items() if k != "speed"}
    for c, s in row.get("speed", {}).items():
        out[f"{c}_output_tok_s"] = s["output_tok_s"]
        out[f"{c}_p50_ttft_ms"] = s["p50_ttft_ms"]
    return out
