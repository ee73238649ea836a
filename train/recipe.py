"""The fine-tuning recipe: what each Ray Train worker runs.

``setup() / train() / save_checkpoint() / cleanup()`` on one class (torchtune's shape);
``train_loop_per_worker`` only builds and calls it. The same recipe trains a LoRA adapter or
every parameter, under DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO-2/3.

Checkpoints hold the trainable weights, optimizer, scheduler, RNG and data position, so a run
that loses a worker restarts from the last one and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from homefire.train.config import TrainConfig
from homefire.train.data import IGNORE_INDEX, pad_batch

STATE_FILE = "trainer_state.json"
ARTIFACT_DIR = "artifact"


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg.deepspeed`` (fp32 on CPU, bf16 on GPU)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": False, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    out = {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.scaling.use_gpu:
        out["bf16"] = {"enabled": True}
    return out


class FinetuneRecipe:
    """One worker's share of a run. ``job`` carries what the driver resolved (model path, step counts)."""

    def __init__(self, cfg: TrainConfig, job: dict[str, Any]):
        self.cfg = cfg
        self.job = job
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.engine = None  # the DeepSpeed engine, when used

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        import ray.train
        import torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if self.cfg.scaling.use_gpu else torch.device("cpu")
        torch.manual_seed(self.cfg.optim.seed)
        random.seed(self.cfg.optim.seed)
        model = self._load_model()
        self.teacher = self._load_teacher() if self.cfg.method == "distill" else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in trainable)
        self.total_params = sum(p.numel() for p in model.parameters())
        from transformers import get_scheduler

        def make_scheduler(optimizer):
            return get_scheduler(
                self.cfg.optim.scheduler, optimizer, num_warmup_steps=self.cfg.optim.warmup_steps,
                num_training_steps=self.job["total_steps"],
            )

        if self.cfg.deepspeed is not None:
            import deepspeed

            import deepspeed.ops

            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (inference only) on every
            # initialize; training with gloo never uses it, so skip the ~25 s build.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            ds_cfg = deepspeed_config(self.cfg)
            optimizer = None
            if self.cfg.deepspeed.offload_optimizer:
                # ZeRO-Offload refuses a client optimizer; DeepSpeed's AdamW with torch_adam compiles nothing.
                ds_cfg["optimizer"] = {"type": "AdamW", "params": {
                    "lr": self.cfg.optim.lr, "weight_decay": self.cfg.optim.weight_decay,
                    "torch_adam": not self.cfg.scaling.use_gpu}}
            else:
                optimizer = self._optimizer(trainable)
            # DeepSpeed steps the schedule itself, once per optimizer step.
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=trainable, optimizer=optimizer, lr_scheduler=make_scheduler,
                config=ds_cfg, dist_init_required=False,
            )
            self.model = self.engine
        else:
            quantized = self.cfg.method == "lora" and self.cfg.lora.quantize != "none"  # already placed; .to() refuses
            self.model = ray.train.torch.prepare_model(
                model, move_to_device=not quantized, parallel_strategy="ddp" if self.world > 1 else None)
            self.optimizer = self._optimizer(trainable)
            self.scheduler = make_scheduler(self.optimizer)
        checkpoint = ray.train.get_checkpoint()
        on_disk = self.job.get("resume_from")
        if on_disk and (checkpoint is None or _step_of(on_disk) > _step_of(checkpoint.path)):
            checkpoint = ray.train.Checkpoint(on_disk)  # `--resume`: newer than Ray's last registered one
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                self._load_state(Path(d))
            self.resumes.append({"from_step": self.step, "time": time.time()})

    def _load_model(self):
        import torch
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"trust_remote_code": self.cfg.model.trust_remote_code}
        dtype = self.cfg.model.dtype
        kwargs["dtype"] = torch.float32 if dtype == "auto" and not self.cfg.scaling.use_gpu else (
            "auto" if dtype == "auto" else getattr(torch, dtype))
        if self.cfg.method == "lora" and self.cfg.lora.quantize != "none":
            from transformers import BitsAndBytesConfig

            bits = self.cfg.lora.quantize
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=bits == "4bit", load_in_8bit=bits == "8bit", bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
            )
            kwargs["device_map"] = {"": self.device}
        model = AutoModelForCausalLM.from_pretrained(self.job["model_path"], **kwargs)
        model.config.use_cache = False
        if self.cfg.method in ("full", "distill"):
            return model
        from peft import LoraConfig, get_peft_model

        if self.cfg.lora.quantize != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        lora = LoraConfig(
            r=self.cfg.lora.r, lora_alpha=self.cfg.lora.alpha, lora_dropout=self.cfg.lora.dropout,
            target_modules=self.cfg.lora.target_modules, task_type="CAUSAL_LM", bias="none",
        )
        return get_peft_model(model, lora)

    def _load_teacher(self):
        """The frozen teacher, in the student's dtype, on the worker's device."""
        import torch
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if self.cfg.model.dtype == "auto" and not self.cfg.scaling.use_gpu else (
            "auto" if self.cfg.model.dtype == "auto" else getattr(torch, self.cfg.model.dtype))
        teacher = AutoModelForCausalLM.from_pretrained(
            self.job["teacher_path"], dtype=dtype, trust_remote_code=self.cfg.model.trust_remote_code)
        return teacher.to(self.device).eval().requires_grad_(False)

    def _optimizer(self, params):
        import torch

        return torch.optim.AdamW(params, lr=self.cfg.optim.lr, weight_decay=self.cfg.optim.weight_decay)

    @property
    def unwrapped(self):
        return self.model.module if hasattr(self.model, "module") else self.model

    # ---------------------------------------------------------------- train
    def _batches(self, split: str, epoch: int):
        import ray.train

        shard = ray.train.get_dataset_shard(split)
        kwargs: dict[str, Any] = {"batch_size": self.cfg.optim.batch_size, "batch_format": "numpy"}
        if split == "train":
            kwargs.update(drop_last=True, local_shuffle_buffer_size=4 * self.cfg.optim.batch_size,
                          local_shuffle_seed=self.cfg.data.seed * 1000 + epoch)
        for batch in shard.iter_batches(**kwargs):
            yield pad_batch(batch, self.job["pad_id"])

    def _forward(self, batch):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch)
        loss = out.loss
        if self.teacher is not None:
            import torch

            spec = self.cfg.distill
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kl = distill_kl(out.logits, teacher_logits, batch["labels"], spec.temperature)
            loss = (1 - spec.alpha) * loss + spec.alpha * kl
        return loss, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), int(batch["attention_mask"].sum())

    def train(self) -> None:
        import ray.train
        import torch

        cfg, job = self.cfg, self.job
        total, per_epoch, accum = job["total_steps"], job["steps_per_epoch"], cfg.optim.grad_accum
        if self.step == 0:
            self.evals.append({"step": 0, **self.evaluate()})
            self._log_line(f"eval before training: loss {self.evals[-1]['eval_loss']:.4f} ppl {self.evals[-1]['perplexity']:.2f}")
        self.model.train()
        t_last, tokens_since = time.perf_counter(), 0
        while self.step < total:
            epoch, done_in_epoch = divmod(self.step, per_epoch)
            skip = done_in_epoch * accum  # micro-batches this epoch already consumed before the checkpoint
            losses: list[float] = []
            for i, batch in enumerate(self._batches("train", epoch)):
                if i < skip:
                    continue
                if i >= per_epoch * accum or self.step >= total:
                    break
                loss, _, ntok = self._forward(batch)
                if self.engine is not None:
                    self.engine.backward(loss)
                    self.engine.step()
                else:
                    (loss / accum).backward()
                losses.append(float(loss.detach()))
                tokens_since += ntok
                if (i + 1) % accum:
                    continue
                if self.engine is None:
                    torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.optim.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                lr = self.scheduler.get_last_lr()[0]
                if self.engine is None:
                    self.scheduler.step()
                self.step += 1
                step_loss = self._mean_across_workers(sum(losses) / len(losses))
                losses = []
                if self.step % cfg.log_every_n_steps == 0 or self.step == total:
                    now = time.perf_counter()
                    tok_s = self._sum_across_workers(tokens_since) / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    rec = {"step": self.step, "epoch": epoch, "loss": round(step_loss, 6), "lr": lr, "tokens_per_s": round(tok_s, 1)}
                    self.history.append(rec)
                    self._log_line(f"step {self.step:>5}/{total}  loss {step_loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s", rec)
                if cfg.eval.every_n_steps and self.step % cfg.eval.every_n_steps == 0 and self.step < total:
                    self.evals.append({"step": self.step, **self.evaluate()})
                    self.model.train()
                if self.step % cfg.checkpoint.every_n_steps == 0 and self.step < total:
                    self.save_checkpoint(final=False)
                    t_last = time.perf_counter()
        self.evals.append({"step": self.step, **self.evaluate()})
        self._log_line(f"eval after training: loss {self.evals[-1]['eval_loss']:.4f} ppl {self.evals[-1]['perplexity']:.2f}")
        self.save_checkpoint(final=True)

    def _reduce(self, value: float, op) -> float:
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def _mean_across_workers(self, value: float) -> float:
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.SUM) / self.world

    def _sum_across_workers(self, value: float) -> float:
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.SUM)

    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss and perplexity on the held-out split, across every worker."""
        import torch

        self.model.eval()
        # The bare module: DDP's forward would sync buffers, and ranks may hold different batch counts.
        model = self.model if self.engine is not None else self.unwrapped
        total_loss, total_tokens = 0.0, 0
        with torch.no_grad():
            for n, batch in enumerate(self._batches("eval", 0)):
                if self.cfg.eval.max_batches and n >= self.cfg.eval.max_batches:
                    break
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out = model(**batch)
                ntgt = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total_loss += float(out.loss) * ntgt
                total_tokens += ntgt
        loss_sum = self._sum_across_workers(total_loss)
        tok_sum = self._sum_across_workers(total_tokens)
        if tok_sum == 0:
            return {"eval_loss": float("nan"), "perplexity": float("nan"), "eval_tokens": 0}
        loss = loss_sum / tok_sum
        return {"eval_loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 4), "eval_tokens": int(tok_sum)}

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step, "history": self.history, "evals": self.evals, "resumes": self.resumes,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
        }

    def save_checkpoint(self, final: bool) -> None:
        """Every worker calls this (Ray's report is collective); rank 0 writes DDP state, every rank its ZeRO shard."""
        import ray.train
        import torch
        from safetensors.torch import save_file

        metrics = {"step": self.step, "final": final, "loss": self.history[-1]["loss"] if self.history else None}
        with tempfile.TemporaryDirectory(prefix="homefire-ckpt-") as tmp:
            d = Path(tmp)
            if self.engine is not None:
                self.engine.save_checkpoint(str(d / "deepspeed"), tag="state", client_state={"step": self.step})
            elif self.rank == 0:
                params = {n: p.detach().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}
                save_file(params, str(d / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), d / "optimizer.pt")
            if self.rank == 0:
                torch.save({"scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, d / "scheduler.pt")
                (d / STATE_FILE).write_text(json.dumps(self._state()))
            if final:
                self._save_artifact(d / ARTIFACT_DIR)
                metrics.update(state=self._state())
            has_files = any(d.iterdir())
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
                checkpoint_dir_name=f"checkpoint_step_{self.step:06d}" + ("_final" if final else ""),
            )

    def _save_artifact(self, out: Path) -> None:
        """The deliverable: a PEFT adapter (safetensors) or a full model directory, written by rank 0."""
        state_dict = None
        if self.engine is not None and self.cfg.deepspeed.stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        if self.rank != 0:
            return
        model = self.unwrapped
        if self.cfg.method == "lora":
            if state_dict is not None:
                state_dict = {k: v for k, v in state_dict.items() if "lora_" in k}
            model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        else:
            model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.job["model_path"]).save_pretrained(out)
            gen = Path(self.job["model_path"]) / "generation_config.json"
            if gen.is_file():
                (out / "generation_config.json").write_text(gen.read_text())

    def _load_state(self, d: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = json.loads((d / STATE_FILE).read_text())
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        self.resumes = state.get("resumes", [])
        if self.engine is not None:
            self.engine.load_checkpoint(str(d / "deepspeed"), tag="state")
        else:
            missing = self.unwrapped.load_state_dict(load_file(str(d / "trainable.safetensors")), strict=False)
            if missing.unexpected_keys:
                raise RuntimeError(f"checkpoint {d} does not match the model: {missing.unexpected_keys[:3]}")
            self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        extra = torch.load(d / "scheduler.pt", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])

    # ---------------------------------------------------------------- logging
    def _log_line(self, text: str, record: dict | None = None) -> None:
        if self.rank != 0:
            return
        # Not print(): Ray Train patches print into its logger and echoes it, which shows every line twice.
        sys.stdout.write(f"[homefire train] {text}\n")
        sys.stdout.flush()
        progress = self.job.get("progress_log")
        if progress:  # the driver prints these (the workers' own output stays in Ray's log folder)
            with open(progress, "a") as f:
                f.write(f"[homefire train] {text}\n")
        log = self.job.get("metrics_log")
        if record is not None and log:
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")

    def cleanup(self) -> None:
        self.engine = None


def distill_kl(student_logits, teacher_logits, labels, temperature: float = 1.0):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), the mean over target tokens (the positions the LM loss
    scores: shifted by one, labels not IGNORE_INDEX). Hinton et al.'s T^2 keeps the gradient scale independent of T."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != IGNORE_INDEX
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every report (with its whole metrics dict) at INFO on the worker's console; the
    step lines already say it. Its logger is named by file path, hence the import."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _step_of(checkpoint_dir: str) -> int:
    name = Path(checkpoint_dir).name  # checkpoint_step_000010[_final]
    return int(name.split("_")[2]) if name.startswith("checkpoint_step_") else -1


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    cfg = TrainConfig.model_validate(config["cfg"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_ray_train_reports()
    recipe = FinetuneRecipe(cfg, config["job"])
    recipe.setup()
    recipe.train()
    recipe.cleanup()


__all__ = ["ARTIFACT_DIR", "FinetuneRecipe", "deepspeed_config", "train_loop_per_worker"]
