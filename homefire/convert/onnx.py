"""``--to onnx-int4 | onnx-int8 | onnx-fp32``: onnxruntime-genai's model builder.

The builder (``python -m onnxruntime_genai.models.builder``) reads the Hugging Face
directory, writes ``model.onnx`` (+ ``model.onnx.data``) with its KV cache, RoPE and
attention fused into ONNX Runtime's contrib ops, and a ``genai_config.json`` that
:class:`homefire.serve.engines.onnx.OnnxEngine` loads. The int4 and int8 targets quantize
every MatMul's weights in blocks of :data:`BLOCK_SIZE` (``MatMulNBits``) with fp32
compute (``accuracy_level=1``); embeddings and norms stay fp32. A weight whose input
width is not a multiple of the block (the demo models' ``intermediate_size`` of 344 or
688) is padded to whole blocks by the quantizer, so no shape of ours is refused for that.

The builder runs in a child process: it imports torch and onnx_ir, prints a great deal,
and is only shown when it fails (the tail of its log becomes the error message). It
reads the local directory only (``HF_HUB_OFFLINE``, ``hf_token=false``) and its cache
lives in a temporary directory, so nothing is left behind.

A GPU (``cuda``/``tensorrt``) deployment is not a separate format: the same ``onnx``
entry is served with ``provider: cuda`` or ``provider: tensorrt``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from homefire.convert import hf_architecture
from homefire.errors import ConfigError

#: ``--to`` target -> the builder's ``--precision``.
PRECISIONS: dict[str, str] = {"onnx-int4": "int4", "onnx-int8": "int8", "onnx-fp32": "fp32"}

#: Weights per quantization block (int4/int8). 32 is the builder's default and the finest block ORT's CPU
#: MatMulNBits kernels are tuned for; widths that are not a multiple are padded, not refused.
BLOCK_SIZE = 32

#: MatMulNBits compute precision: 1 = fp32 activations (the target's promise: weight-only quantization).
#: The builder's CPU default, 4, also quantizes activations to int8 (faster, less exact).
ACCURACY_LEVEL = 1

#: The longest a builder run may take (a 7B model's int4 export takes a few minutes on a workstation).
BUILDER_TIMEOUT_S = 3600.0

#: Lines of the builder's log quoted when it fails.
_LOG_TAIL_LINES = 25

#: ``architectures[0]`` values onnxruntime-genai 0.18's builder exports as a text decoder.
SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset({
    "ChatGLMForConditionalGeneration", "ChatGLMModel", "Ernie4_5ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GptOssForCausalLM", "GraniteForCausalLM",
    "HunYuanDenseV1ForCausalLM", "InternLM2ForCausalLM", "Lfm2ForCausalLM", "LlamaForCausalLM",
    "MistralForCausalLM", "NemotronForCausalLM", "OlmoForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "Phi3SmallForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM",
})

#: Tokenizer and chat-template files copied from the source over the builder's copies, so that the
#: converted model renders chats and decodes exactly as the source does.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "generation_config.json",
)


def check(src: Path, target: str) -> None:
    """Refuse, before any work, what the builder cannot make.

    Raises:
        ConfigError: an unknown onnx target, an architecture the builder does not export, a model whose
            weights are not in the directory, or a machine without the builder's dependencies.
    """
    if target not in PRECISIONS:
        raise ConfigError(f"--to '{target}' is not an ONNX target. Fix: use one of {', '.join(PRECISIONS)}")
    arch = hf_architecture(src)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{src.name}: architecture '{arch}' cannot be converted to ONNX (onnxruntime-genai 0.18's model builder "
            f"exports {', '.join(sorted(SUPPORTED_ARCHITECTURES))}). Fix: serve it with engine vllm, or convert "
            "it to gguf (--to gguf-q8_0) if llama.cpp supports it"
        )
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ConfigError(
            f"{src.name} is already quantized ({method}); the CPU builder re-exports such weights as they are. "
            "Fix: convert the unquantized parent model"
        )
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise ConfigError(
            f"{src} holds no weights (*.safetensors or *.bin). Fix: convert a complete hf model directory"
        )
    missing = [m for m in ("onnxruntime_genai", "onnx_ir", "onnx", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"--to {target}: the ONNX model builder needs {', '.join(missing)}, which is not installed. "
            "Fix: pip install 'homefire[onnx]'"
        )


def builder_command(src: Path, out: Path, target: str, cache_dir: Path) -> list[str]:
    """The model builder's command line for ``target`` (CPU execution provider)."""
    precision = PRECISIONS[target]
    extra = ["hf_token=false"]
    if precision != "fp32":
        extra += [f"block_size={BLOCK_SIZE}", f"accuracy_level={ACCURACY_LEVEL}", "is_symmetric=true"]
    return [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
        "-p", precision, "-e", "cpu", "-c", str(cache_dir), "--extra_options", *extra,
    ]


def convert(src: Path, out: Path, target: str) -> dict[str, Any]:
    """Build the ONNX model of ``src`` into ``out`` (an empty directory).

    Returns:
        The recipe facts recorded in the registry entry, e.g.
        ``{"precision": "int4", "block_size": 32, "accuracy_level": 1, "is_symmetric": True, ...}``.

    Raises:
        ConfigError: the builder failed (the message ends with its log's tail) or wrote no model.
    """
    precision = PRECISIONS[target]
    with tempfile.TemporaryDirectory(prefix="onnx-builder-") as tmp:
        cmd = builder_command(src, out, target, Path(tmp) / "cache")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(Path(tmp) / "hf")}
        try:
            proc = subprocess.run(
                cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=BUILDER_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as err:
            raise ConfigError(
                f"the ONNX model builder did not finish within {BUILDER_TIMEOUT_S:.0f}s for {src.name}. "
                f"Fix: convert on a machine with more memory and cores. Last output:\n{_tail(err.output)}"
            ) from None
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        raise ConfigError(
            f"the ONNX model builder failed on {src.name} ({target}, exit code {proc.returncode}). Fix: check that "
            "the model loads with transformers and that its shapes suit the builder; its log ends:\n"
            f"{_tail(proc.stdout)}"
        )
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    genai = json.loads((out / "genai_config.json").read_text())
    facts: dict[str, Any] = {
        "precision": precision,
        "execution_provider": "cpu",
        "builder": f"onnxruntime-genai {_genai_version()}",
        "context_length": genai["model"]["context_length"],
    }
    if precision != "fp32":
        facts.update(block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL, is_symmetric=True)
    return facts


def _tail(log: str | bytes | None) -> str:
    if isinstance(log, bytes):
        log = log.decode(errors="replace")
    lines = [ln for ln in (log or "").replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(no output)"


def _genai_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-genai", "onnxruntime-genai-cuda"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "?"
