"""GGUF for llama.cpp: ``homefire models convert <llama> --to gguf-q8_0`` (or gguf-q4_0, gguf-f16, gguf-f32).

Writes one self-contained ``model.gguf`` from a Hugging Face ``LlamaForCausalLM`` directory:
the weights (read with ``safetensors``, no torch), the hyper-parameters llama.cpp needs, and the
byte-level BPE tokenizer with its special tokens and chat template, so that the llama.cpp engine
needs nothing but the file. The only module in homefire that imports ``gguf``.

Precision: 2-D weights take the target's type; norms (1-D) stay float32, as llama.cpp keeps
them. A weight whose rows are not a whole number of quantization blocks (32 values) cannot be
block-quantized: it is written as float16 instead, as ``llama-quantize`` falls back, and listed
in the entry's ``fallback_tensors``.

Example::

    from homefire.convert import convert
    entry = convert("demo-tiny", "gguf-q8_0")   # registry entry demo-tiny-gguf-q8_0, format gguf
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from homefire.convert import hf_architecture
from homefire.errors import ConfigError

logger = logging.getLogger(__name__)

#: Hugging Face architectures this converter writes (as llama.cpp's ``llama`` architecture).
ARCHITECTURES = ("LlamaForCausalLM",)
#: Values per quantization block of q8_0 and q4_0.
BLOCK_SIZE = 32
#: Name of the file written into the output directory.
FILE_NAME = "model.gguf"


@dataclass(frozen=True)
class _Precision:
    """How one target stores 2-D weights."""

    label: str
    #: gguf.GGMLQuantizationType member name.
    tensor_type: str
    #: gguf.LlamaFileType member name (general.file_type).
    file_type: str
    blocked: bool


_PRECISIONS = {
    "gguf-q8_0": _Precision("q8_0", "Q8_0", "MOSTLY_Q8_0", True),
    "gguf-q4_0": _Precision("q4_0", "Q4_0", "MOSTLY_Q4_0", True),
    "gguf-f16": _Precision("f16", "F16", "MOSTLY_F16", False),
    "gguf-f32": _Precision("f32", "F32", "ALL_F32", False),
}

# Hugging Face Llama tensor name -> GGUF tensor name. ``{n}`` is the layer index.
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
#: Buffers some checkpoints carry that llama.cpp recomputes.
_SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a checkpoint tensor; None for one llama.cpp does not store."""
    if _SKIPPED.search(hf_name):
        return None
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ConfigError(
        f"tensor '{hf_name}' has no place in a llama.cpp Llama GGUF (biases, adapters and quantized checkpoints are "
        "not handled). Fix: convert a plain LlamaForCausalLM checkpoint (merge adapters first)"
    )


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved pairs.

    HF keeps each head's rotary pairs as (i, i + d/2); llama.cpp rotates adjacent rows (2i, 2i + 1).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- reading the Hugging Face directory ---------------------------------------------------------------------------


def _config(src: Path) -> dict[str, Any]:
    return json.loads((src / "config.json").read_text())


def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"{src} has no *.safetensors weights (pytorch_model.bin is not read). Fix: re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    return files


def _tensor_names(src: Path) -> list[tuple[Path, str]]:
    """(file, name) of every checkpoint tensor, in model order: embedding, blocks by number, head."""
    from safetensors import safe_open

    names = []
    for path in _weight_files(src):
        with safe_open(path, framework="numpy") as f:
            names.extend((path, k) for k in f.keys())

    def order(item: tuple[Path, str]) -> tuple[int, str]:
        m = _LAYER_RE.match(item[1])
        if m:
            return int(m.group(1)), item[1]
        return (-1 if "embed" in item[1] else 1 << 30), item[1]

    return sorted(names, key=order)


def _read(path: Path, name: str) -> np.ndarray:
    """One tensor as float32 (bfloat16 needs ``ml_dtypes`` so numpy can hold it)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        if f.get_slice(name).get_dtype() == "BF16":
            try:
                import ml_dtypes  # noqa: F401  (registers numpy's bfloat16)
            except ImportError as err:
                raise ConfigError(
                    f"{path.name} holds bfloat16 weights and numpy needs ml_dtypes to read them. "
                    "Fix: pip install ml_dtypes"
                ) from err
        return np.asarray(f.get_tensor(name), dtype=np.float32)


def _tokenizer_files(src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    tok_json, tok_cfg = src / "tokenizer.json", src / "tokenizer_config.json"
    if not tok_json.is_file():
        raise ConfigError(
            f"{src} has no tokenizer.json; the GGUF must carry the tokenizer. Fix: save the model's fast tokenizer "
            "into the directory (tokenizer.save_pretrained)"
        )
    cfg = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}
    return json.loads(tok_json.read_text()), cfg


def _check_byte_level_bpe(tok: dict[str, Any], src: Path) -> None:
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        problems.append(f"model {model.get('type')!r}{' with byte_fallback' if model.get('byte_fallback') else ''}")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append(f"pre-tokenizer {json.dumps(pre)}")
    if tok.get("normalizer"):
        problems.append(f"normalizer {tok['normalizer'].get('type')!r}")
    if problems:
        raise ConfigError(
            f"{src}/tokenizer.json is not a plain GPT-2 style byte-level BPE ({'; '.join(problems)}); this converter "
            "writes only that tokenizer kind (llama.cpp 'gpt2' with the 'gpt-2' pre-tokenizer). Fix: use "
            "llama.cpp's convert_hf_to_gguf.py for this model"
        )


def _special(cfg: dict[str, Any], key: str) -> str | None:
    value = cfg.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(src: Path, cfg: dict[str, Any]) -> str | None:
    jinja = src / "chat_template.jinja"  # transformers >= 4.50 saves the template beside the config
    if jinja.is_file():
        return jinja.read_text()
    return cfg.get("chat_template")


def _model_name(src: Path, config: dict[str, Any]) -> str:
    if config.get("_name_or_path"):
        return Path(config["_name_or_path"]).name
    # A registry entry keeps its files in <name>/<version>/files.
    if src.name == "files" and src.parent.name.isdigit():
        return src.parent.parent.name
    return src.name


# -- the converter's two entry points -----------------------------------------------------------------------------


def check(src: Path, target: str) -> None:
    """Refuse what this converter cannot write, before anything is written.

    Raises:
        ConfigError: an architecture other than LlamaForCausalLM, a config llama.cpp's Llama cannot express
            (biases, non-SiLU activation, RoPE scaling), a tokenizer that is not byte-level BPE, a hidden size the
            target's 32-value blocks do not divide, or a checkpoint tensor with no GGUF name.
    """
    arch = hf_architecture(src)
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"--to {target}: architecture {arch} is not handled by homefire's GGUF converter (it writes "
            f"{', '.join(ARCHITECTURES)}). Fix: use llama.cpp's convert_hf_to_gguf.py for {arch}, or --to onnx-*"
        )
    if target not in _PRECISIONS:
        raise ConfigError(f"--to {target} is not a GGUF target. Fix: use one of {', '.join(_PRECISIONS)}")
    config = _config(src)
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"{src}: hidden_act {config['hidden_act']!r}; llama.cpp's Llama uses silu. "
            "Fix: use llama.cpp's convert_hf_to_gguf.py"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError(
            f"{src}: attention_bias/mlp_bias are set; this converter writes bias-free Llama. "
            "Fix: use llama.cpp's convert_hf_to_gguf.py"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{src}: rope_type {rope_type!r} is not written by this converter (only default RoPE). "
            "Fix: use llama.cpp's convert_hf_to_gguf.py"
        )
    hidden = int(config["hidden_size"])
    precision = _PRECISIONS[target]
    if precision.blocked and hidden % BLOCK_SIZE:
        raise ConfigError(
            f"--to {target}: hidden_size {hidden} is not a multiple of the {precision.label} block size {BLOCK_SIZE}, "
            "so almost no weight could be quantized. Fix: use --to gguf-f16 or gguf-f32"
        )
    tok, _ = _tokenizer_files(src)
    _check_byte_level_bpe(tok, src)
    for _, name in _tensor_names(src):
        _gguf_name(name)


def convert(src: Path, out: Path, target: str) -> dict[str, Any]:
    """Write ``out/model.gguf`` from the Llama directory ``src``.

    Returns:
        Facts for the registry entry: ``file``, ``quant``, ``tensors`` and ``fallback_tensors`` (weights kept as
        float16 because their rows are not whole blocks).
    """
    import gguf
    from tqdm import tqdm

    precision = _PRECISIONS[target]
    config = _config(src)
    tok, tok_cfg = _tokenizer_files(src)
    writer = gguf.GGUFWriter(out / FILE_NAME, arch="llama")

    logger.info("gguf: writing hyper-parameters and tokenizer of %s", src)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope = config.get("rope_parameters") or {}
    writer.add_name(_model_name(src, config))
    writer.add_file_type(int(getattr(gguf.LlamaFileType, precision.file_type)))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    n_vocab = _write_tokenizer(writer, gguf, src, tok, tok_cfg, int(config.get("vocab_size") or 0))
    writer.add_vocab_size(n_vocab)

    logger.info("gguf: converting tensors to %s", precision.label)
    qtype = getattr(gguf.GGMLQuantizationType, precision.tensor_type)
    fallback: list[str] = []
    written = 0
    names = _tensor_names(src)
    for path, hf_name in tqdm(names, desc=f"gguf {precision.label}", unit="tensor", disable=None):
        name = _gguf_name(hf_name)
        if name is None:
            continue
        data = _read(path, hf_name)
        written += 1
        if name.endswith("attn_q.weight"):
            data = _rope_permute(data, n_head)
        elif name.endswith("attn_k.weight"):
            data = _rope_permute(data, n_head_kv)
        if data.ndim == 1:
            writer.add_tensor(name, data)  # norms stay float32
        elif precision.blocked and data.shape[-1] % BLOCK_SIZE:
            logger.info(
                "gguf: %s rows are %d long, not whole %s blocks: kept as f16", name, data.shape[-1], precision.label
            )
            fallback.append(name)
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype if precision.blocked else None)

    logger.info("gguf: writing %s", out / FILE_NAME)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": FILE_NAME, "quant": precision.label, "tensors": written, "fallback_tensors": fallback}


def _write_tokenizer(writer: Any, gguf: Any, src: Path, tok: dict[str, Any], cfg: dict[str, Any], n_config: int) -> int:
    """Write the ``tokenizer.ggml.*`` keys and the chat template; return the number of tokens written."""
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    n_vocab = max(n_config, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[text].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        text = _special(cfg, key)
        if text is not None:
            if text not in vocab:
                raise ConfigError(f"{src}: {key} {text!r} is not in the vocabulary. Fix: repair tokenizer_config.json")
            add(vocab[text])
    writer.add_add_bos_token(bool(cfg.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(cfg.get("add_eos_token", False)))
    template = _chat_template(src, cfg)
    if template:
        writer.add_chat_template(template)
    return n_vocab


__all__ = ["ARCHITECTURES", "BLOCK_SIZE", "FILE_NAME", "check", "convert"]
