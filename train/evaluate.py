"""Task metric: greedy answers to held-out prompts, compared with the references, before and after training.

Runs as one Ray task next to the workers (a GPU task when the run trains on GPUs), on the
base model and then on the trained artifact, so the two scores come from the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from homefire.train.config import TrainConfig


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).lower()


def _score(model, tokenizer, examples: list[dict[str, Any]], max_new_tokens: int, device) -> tuple[float, list[str]]:
    import torch

    hits, answers = 0, []
    for ex in examples:
        prompt = tokenizer.apply_chat_template(ex["messages"], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        answers.append(answer)
        hits += normalize(answer) == normalize(ex["reference"])
    return hits / max(len(examples), 1), answers


def _exact_match_task(model_path: str, artifact: str, examples: list[dict], max_new_tokens: int, method: str,
                      use_gpu: bool, trust_remote_code: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code).to(device).eval()
    before, _ = _score(base, tokenizer, examples, max_new_tokens, device)
    if method == "lora":
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, artifact).to(device).eval()
    else:
        tuned = AutoModelForCausalLM.from_pretrained(artifact, trust_remote_code=trust_remote_code).to(device).eval()
    after, answers = _score(tuned, tokenizer, examples, max_new_tokens, device)
    samples = [{"prompt": ex["messages"][-1]["content"], "reference": ex["reference"], "answer": a}
               for ex, a in zip(examples[:3], answers[:3])]
    return {"before": before, "after": after, "n": len(examples), "samples": samples}


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


__all__ = ["exact_match_before_after", "normalize"]
