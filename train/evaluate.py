"""Task metric: greedy answers to held-out prompts, compared with the references, before and after training.

Runs as one Ray task next to the workers (a GPU task when the run trains on GPUs), on the
base model and then on the trained artifact, so the two scores come from the same code
(:mod:`homefire.evaluation`, which `homefire tune` scores its variants with too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from homefire import evaluation
from homefire.evaluation import Example
from homefire.train.config import TrainConfig


def transformers_generate(model, tokenizer, max_new_tokens: int, device) -> Callable[[Example], str]:
    """Greedy answers on transformers, for :func:`homefire.evaluation.score` (chats through the chat template)."""
    import torch

    def generate(ex: Example) -> str:
        if ex.messages is not None:
            prompt = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = ex.prompt
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate


def _exact_match_task(model_path: str, artifact: str, examples: list[dict], max_new_tokens: int, method: str,
                      use_gpu: bool, trust_remote_code: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = [Example(ex["reference"], messages=ex["messages"], where=ex.get("where", "")) for ex in examples]
    base = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code).to(device).eval()
    before = evaluation.score(task, transformers_generate(base, tokenizer, max_new_tokens, device))
    if method == "lora":
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, artifact).to(device).eval()
    else:
        tuned = AutoModelForCausalLM.from_pretrained(artifact, trust_remote_code=trust_remote_code).to(device).eval()
    after = evaluation.score(task, transformers_generate(tuned, tokenizer, max_new_tokens, device))
    return {"before": before["score"], "after": after["score"], "n": len(task), "samples": after["samples"]}


def exact_match_before_after(cfg: TrainConfig, model_path: str, artifact: str, examples: list[dict]) -> dict[str, Any]:
    """Exact-match accuracy of the base model and of the trained artifact on ``cfg.eval.exact_match.samples`` examples."""
    import ray

    spec = cfg.eval.exact_match
    task = ray.remote(_exact_match_task).options(
        num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0,
    )
    return ray.get(task.remote(
        model_path, str(Path(artifact)), examples[: spec.samples], spec.max_new_tokens, cfg.method,
        cfg.scaling.use_gpu, cfg.model.trust_remote_code,
    ))


__all__ = ["exact_match_before_after", "transformers_generate"]
