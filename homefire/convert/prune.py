"""Pruning: ``homefire models convert <entry> --to prune-<method>-<amount>``, a smaller or sparser hf model.

``amount`` is always the share removed, in percent (or ``2of4``, the semi-structured pattern):

* **Unstructured**, same shapes, zeros in the weights of every linear layer of the decoder blocks:
  ``prune-magnitude-50`` (smallest ``|W|`` per layer) and ``prune-wanda-50`` (smallest ``|W| * ||X||`` per output
  row, Sun et al. 2023, activations from calibration text). ``prune-magnitude-2of4`` / ``prune-wanda-2of4`` keep
  the 2 largest of every 4 consecutive input weights. These variants are **quality-only**: no CPU engine homefire
  serves with (vLLM CPU, ONNX Runtime, llama.cpp) runs sparse weights faster than dense ones, so they show what
  quality a sparse GPU kernel would keep, not a speedup.
* **Structured**, smaller dense shapes that every engine runs faster, the same width in every layer (vLLM needs
  one shape per model) and head sizes unchanged (vLLM's CPU attention takes a fixed set):
  ``prune-mlp-25`` drops a quarter of the MLP's intermediate neurons (the least important by
  ``||act|| * ||down_proj column||``, rounded to a multiple of 8), ``prune-heads-25`` a quarter of the key/value head
  groups with their query heads (by ``||o_proj input|| * ||o_proj columns||``), ``prune-layers-25`` a quarter of the
  decoder layers (those whose output is most like their input: Men et al. 2024's block influence).

Structured pruning costs quality that distillation from the original (``homefire distill``) wins back.
Calibration text: the English prose that ships with CPython (pydoc's topic help), 16 windows of up to 256 tokens.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError

logger = logging.getLogger(__name__)

UNSTRUCTURED = ("magnitude", "wanda")
STRUCTURED = ("mlp", "heads", "layers")
METHODS = UNSTRUCTURED + STRUCTURED
PATTERN = re.compile(r"^prune-(?P<method>[a-z]+)-(?P<amount>\d{1,2}|2of4)$")
#: Structured pruning reads these module names (Llama, Mistral, Qwen2/3 decoder blocks).
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
CALIBRATION_WINDOWS = 16
CALIBRATION_LEN = 256
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "tokenizer.model", "generation_config.json", "homefire_recipe.json")


@dataclass(frozen=True)
class PruneSpec:
    method: str
    #: Share removed (0..1); None for the 2:4 pattern.
    amount: float | None

    @property
    def structured(self) -> bool:
        return self.method in STRUCTURED

    @property
    def about(self) -> str:
        if self.amount is None:
            return f"{self.method} 2:4 sparsity (quality-only: no CPU engine runs it faster)"
        pct = f"{self.amount:.0%}"
        return {
            "magnitude": f"{pct} of weights zeroed by magnitude (quality-only)",
            "wanda": f"{pct} of weights zeroed by |W|*||X|| (quality-only)",
            "mlp": f"{pct} of MLP neurons removed (smaller, faster)",
            "heads": f"{pct} of attention head groups removed (smaller, faster)",
            "layers": f"{pct} of decoder layers removed (smaller, faster)",
        }[self.method]


def parse(target: str) -> PruneSpec:
    """``prune-wanda-50`` -> PruneSpec('wanda', 0.5); ConfigError naming the fix otherwise."""
    m = PATTERN.match(target)
    example = "prune-wanda-50, prune-magnitude-2of4, prune-mlp-25, prune-heads-25 or prune-layers-25"
    if m is None or m["method"] not in METHODS:
        raise ConfigError(f"'{target}' is not a pruning target. Fix: prune-<{'|'.join(METHODS)}>-<percent removed "
                          f"1-99 | 2of4>, e.g. {example}")
    method, amount = m["method"], m["amount"]
    if amount == "2of4":
        if method not in UNSTRUCTURED:
            raise ConfigError(f"'{target}': 2of4 is a sparsity pattern for magnitude or wanda. Fix: prune-wanda-2of4, "
                              f"or a percent for {method} (prune-{method}-25)")
        return PruneSpec(method, None)
    if not 1 <= int(amount) <= 99:
        raise ConfigError(f"'{target}': the percent removed must be 1-99. Fix: e.g. prune-{method}-25")
    return PruneSpec(method, int(amount) / 100)


def _config(src: Path) -> dict[str, Any]:
    return json.loads((src / "config.json").read_text())


def _shape(cfg: dict[str, Any]) -> dict[str, int]:
    heads = cfg["num_attention_heads"]
    return {
        "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"],
        "heads": heads, "kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "arch": (cfg.get("architectures") or ["?"])[0],
    }


def _kept(spec: PruneSpec, s: dict[str, int]) -> dict[str, int]:
    """The shape after structured pruning (ConfigError when nothing would remain or nothing would go)."""
    a = spec.amount or 0.0
    if spec.method == "mlp":
        keep = int(s["intermediate"] * (1 - a)) // 8 * 8
        if not 8 <= keep < s["intermediate"]:
            raise ConfigError(f"prune-mlp-{round(a * 100)}: intermediate_size {s['intermediate']} would become {keep} "
                              "(kept widths are multiples of 8). Fix: a percent that keeps at least 8 neurons and "
                              "removes some")
        return {**s, "intermediate": keep}
    if spec.method == "heads":
        drop = round(s["kv_heads"] * a)
        if s["kv_heads"] < 2 or not 1 <= drop < s["kv_heads"]:
            raise ConfigError(
                f"prune-heads-{round(a * 100)}: the model has {s['kv_heads']} key/value head group(s); removing "
                f"{a:.0%} of them leaves {s['kv_heads'] - drop}. Fix: a percent that removes at least one group "
                "and keeps one (heads are removed a key/value group at a time)"
            )
        per_group = s["heads"] // s["kv_heads"]
        heads = (s["kv_heads"] - drop) * per_group
        if s["arch"] == "LlamaForCausalLM" and s["hidden"] % heads:  # transformers' (so vLLM's) LlamaConfig refuses
            fits = [round(100 * d / s["kv_heads"]) for d in range(1, s["kv_heads"])
                    if s["hidden"] % ((s["kv_heads"] - d) * per_group) == 0]
            raise ConfigError(
                f"prune-heads-{round(a * 100)}: {heads} heads left do not divide hidden_size {s['hidden']}, which "
                "transformers' LlamaConfig (and so vLLM) requires. Fix: "
                + (f"use {' or '.join(f'prune-heads-{f}' for f in fits)}" if fits else "prune mlp or layers instead")
            )
        return {**s, "kv_heads": s["kv_heads"] - drop, "heads": heads}
    drop = round(s["layers"] * a)
    if not 1 <= drop < s["layers"]:
        raise ConfigError(f"prune-layers-{round(a * 100)}: {s['layers']} layers, removing {a:.0%} removes {drop}. "
                          "Fix: a percent that removes at least one layer and keeps one")
    return {**s, "layers": s["layers"] - drop}


def check(src: Path, target: str) -> None:
    """Refuse what cannot be pruned, before any work: unknown architecture, shapes, 2:4 on widths not divisible by 4."""
    from homefire.convert import hf_architecture

    spec = parse(target)
    arch = hf_architecture(src)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{target}: architecture {arch} is not one homefire prunes. Fix: a Llama, Mistral or Qwen2/3 "
                          f"model ({', '.join(sorted(ARCHITECTURES))})")
    s = _shape(_config(src))
    if spec.amount is None:
        bad = {k: v for k, v in (("hidden_size", s["hidden"]), ("intermediate_size", s["intermediate"]),
                                 ("heads x head_dim", s["heads"] * s["head_dim"])) if v % 4}
        if bad:
            raise ConfigError(f"{target}: 2:4 needs every layer's input width divisible by 4; "
                              f"{', '.join(f'{k} {v}' for k, v in bad.items())} is not. Fix: prune-{spec.method}-50")
    elif spec.structured:
        _kept(spec, s)


# -- calibration --------------------------------------------------------------------------------------------------


def calibration_ids(tokenizer, windows: int = CALIBRATION_WINDOWS, length: int = CALIBRATION_LEN) -> list[list[int]]:
    """``windows`` token windows of the calibration text, spread over all of it."""
    from homefire.models.build import corpus_text

    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    step = max((len(ids) - length) // windows, 1)
    return [ids[i * step:i * step + length] for i in range(windows)]


def _decoder_layers(model) -> list:
    return list(model.model.layers)


def _linears(layer) -> dict[str, Any]:
    import torch

    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _calibrate(model, batches: list[list[int]], want_layer_io: bool) -> tuple[dict[Any, Any], list[float]]:
    """Per linear layer of the decoder, the L2 norm of each input feature over the calibration tokens; and per
    decoder layer, the block influence 1 - mean cos(input, output) (when asked)."""
    import torch

    sq: dict[Any, Any] = {}
    influence = [0.0] * len(_decoder_layers(model))
    counts = [0] * len(influence)
    hooks = []

    def on_linear(mod, args, _out):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sq[mod] = sq.get(mod, 0) + (x * x).sum(0)

    for i, layer in enumerate(_decoder_layers(model)):
        for lin in _linears(layer).values():
            hooks.append(lin.register_forward_hook(on_linear))
        if want_layer_io:
            def on_layer(mod, args, kwargs, out, i=i):
                h_in = (args[0] if args else kwargs["hidden_states"]).detach()
                h_out = (out[0] if isinstance(out, tuple) else out).detach()
                cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
                influence[i] += float((1 - cos).sum())
                counts[i] += cos.numel()
            hooks.append(layer.register_forward_hook(on_layer, with_kwargs=True))
    try:
        with torch.no_grad():
            for ids in batches:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {m: v.sqrt() for m, v in sq.items()}, [v / max(c, 1) for v, c in zip(influence, counts)]


# -- unstructured ---------------------------------------------------------------------------------------------------


def _sparsify(spec: PruneSpec, weight, norms) -> None:
    """Zero ``weight`` in place: ``spec.amount`` of it, or 2 of every 4 along the input dimension."""
    import torch

    score = weight.detach().abs().double()
    if spec.method == "wanda":
        score = score * norms[None, :]
    if spec.amount is None:
        groups = score.reshape(score.shape[0], -1, 4)
        drop = groups.argsort(dim=-1)[..., :2]
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(score.shape)
    elif spec.method == "wanda":  # per output row, as the paper compares
        k = int(score.shape[1] * spec.amount)
        drop = score.argsort(dim=1)[:, :k]
        mask = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    else:  # magnitude: per layer (exactly k, ties broken by position: bf16 weights repeat values)
        k = int(score.numel() * spec.amount)
        mask = torch.ones(score.numel(), dtype=torch.bool)
        mask[score.flatten().argsort()[:k]] = False
        mask = mask.reshape(score.shape)
    weight.data.mul_(mask.to(weight.dtype))


# -- structured -----------------------------------------------------------------------------------------------------


def _keep_rows(linear, index) -> None:
    linear.weight.data = linear.weight.data[index].clone()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[index].clone()
    linear.out_features = len(index)


def _keep_cols(linear, index) -> None:
    linear.weight.data = linear.weight.data[:, index].clone()
    linear.in_features = len(index)


def _prune_mlp(model, norms, keep: int) -> None:
    for layer in _decoder_layers(model):
        mlp = layer.mlp
        score = norms[mlp.down_proj] * mlp.down_proj.weight.detach().double().norm(dim=0)
        index = score.argsort(descending=True)[:keep].sort().values
        _keep_rows(mlp.gate_proj, index)
        _keep_rows(mlp.up_proj, index)
        _keep_cols(mlp.down_proj, index)


def _prune_heads(model, norms, s: dict[str, int], kept: dict[str, int]) -> None:
    import torch

    d, per_group = s["head_dim"], s["heads"] // s["kv_heads"]
    for layer in _decoder_layers(model):
        attn = layer.self_attn
        col = norms[attn.o_proj] * attn.o_proj.weight.detach().double().norm(dim=0)
        group_score = col.reshape(s["kv_heads"], per_group * d).sum(1)
        groups = group_score.argsort(descending=True)[: kept["kv_heads"]].sort().values
        kv_index = torch.cat([torch.arange(g * d, (g + 1) * d) for g in groups.tolist()])
        q_index = torch.cat([torch.arange(g * per_group * d, (g + 1) * per_group * d) for g in groups.tolist()])
        _keep_rows(attn.q_proj, q_index)
        _keep_rows(attn.k_proj, kv_index)
        _keep_rows(attn.v_proj, kv_index)
        _keep_cols(attn.o_proj, q_index)
        for name in ("num_heads", "num_key_value_heads"):  # older transformers keep these on the module
            if hasattr(attn, name):
                setattr(attn, name, kept["heads"] if name == "num_heads" else kept["kv_heads"])


def _prune_layers(model, influence: list[float], keep: int) -> list[int]:
    import torch

    kept = sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:keep])
    layers = _decoder_layers(model)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    return kept


# -- the converter --------------------------------------------------------------------------------------------------


def convert(src: Path, out: Path, target: str) -> dict[str, Any]:
    """Prune the hf model in ``src`` into ``out``; returns the facts kept in the entry's recipe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse(target)
    cfg = _config(src)
    s = _shape(cfg)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    facts: dict[str, Any] = {"method": spec.method, "amount": spec.amount, "pattern": "2:4" if spec.amount is None
                             else None, "calibration": f"pydoc topics, {CALIBRATION_WINDOWS}x{CALIBRATION_LEN} tokens"}
    needs_norms = spec.method != "magnitude"
    norms, influence = _calibrate(model, calibration_ids(tokenizer), spec.method == "layers") if needs_norms else ({}, [])
    params_before = sum(p.numel() for p in model.parameters())
    if not spec.structured:
        zeros = total = 0
        for layer in _decoder_layers(model):
            for lin in _linears(layer).values():
                _sparsify(spec, lin.weight, norms.get(lin))
                zeros += int((lin.weight == 0).sum())
                total += lin.weight.numel()
        facts["sparsity"] = round(zeros / total, 4)
        facts["quality_only"] = True
    else:
        kept = _kept(spec, s)
        if spec.method == "mlp":
            _prune_mlp(model, norms, kept["intermediate"])
            model.config.intermediate_size = kept["intermediate"]
        elif spec.method == "heads":
            _prune_heads(model, norms, s, kept)
            model.config.num_attention_heads = kept["heads"]
            model.config.num_key_value_heads = kept["kv_heads"]
            model.config.head_dim = s["head_dim"]  # hidden_size // heads no longer gives it
        else:
            facts["kept_layers"] = _prune_layers(model, influence, kept["layers"])
            model.config.num_hidden_layers = kept["layers"]
            for key in ("layer_types",):  # per-layer lists in newer configs follow the kept layers
                value = getattr(model.config, key, None)
                if isinstance(value, list) and len(value) == s["layers"]:
                    setattr(model.config, key, [value[i] for i in facts["kept_layers"]])
        facts["shape"] = {"before": s, "after": kept}
    facts["params_before"] = params_before
    facts["params"] = sum(p.numel() for p in model.parameters())
    model.to(getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in _COPIED:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
    logger.info("pruned %s (%s): %d -> %d parameters", src, spec.about, params_before, facts["params"])
    return facts


__all__ = ["METHODS", "PruneSpec", "calibration_ids", "check", "convert", "parse"]
