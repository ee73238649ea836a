"""Build Llama-shaped models offline, cached and keyed on their recipe.

The tokenizer is a byte-level BPE trained on ``pydoc_data/topics.py`` (~750 KB of
English documentation that ships with CPython), with a chat template. The model is a
``LlamaForCausalLM`` initialised from a config and saved as safetensors, so vLLM,
transformers and PEFT load it exactly as they load a downloaded checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from homefire.errors import ModelNotFound
from homefire.registry import Entry, Registry

logger = logging.getLogger(__name__)

#: Bump when the build code changes in a way that changes the artifacts.
BUILD_CODE_VERSION = 3

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

#: A Jinja chat template over the special tokens above (what `apply_chat_template` renders). Tools, tool calls and
#: tool results are rendered the Hermes way (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), so the demo
#: models are served with `tool_parser: hermes`; without tools it renders exactly as before.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\nYou may call these tools; to call one, answer <tool_call>{\"name\": ..., "
    "\"arguments\": {...}}</tool_call>\n' + (tools | tojson) + '<|end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% elif message['content'] is none %}{% set text = '' %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'tool' %}{% set text = '<tool_response>' + text + '</tool_response>' %}{% endif %}"
    "{{ '<|' + ('user' if message['role'] == 'tool' else message['role']) + '|>\n' + text }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelRecipe:
    """Everything that determines a built model; its hash keys the cache."""

    name: str
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    #: Init std; default 1/sqrt(hidden_size). Tiny models need it: at the usual 0.02 the output head's logits
    #: cannot exceed ~2.5 nats, so a fine-tune can hardly make any answer likely.
    initializer_range: float | None = None
    seed: int = 0

    def hash(self) -> str:
        payload = json.dumps({**dataclasses.asdict(self), "code": BUILD_CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEMO_RECIPES: dict[str, ModelRecipe] = {
    # ~5M parameters: the default served model.
    "demo": ModelRecipe(name="demo"),
    # ~0.8M parameters: the second default model and the one tests use.
    "demo-tiny": ModelRecipe(
        name="demo-tiny", vocab_size=2048, hidden_size=128, intermediate_size=344,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
    ),
}


def corpus_text() -> str:
    """The English text that ships with CPython: the pydoc topic help."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics.values())


def build_tokenizer(vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = corpus_text()
    tok.train_from_iterator((text[i : i + 4096] for i in range(0, len(text), 4096)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        model_max_length=1_000_000,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_model(recipe: ModelRecipe, out_dir: str | Path) -> Path:
    """Write tokenizer, config and random-init safetensors weights for ``recipe`` into ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(recipe.vocab_size, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=recipe.initializer_range or round(recipe.hidden_size ** -0.5, 4),
        torch_dtype="float32",
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out_dir)
    (out_dir / "homefire_recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
    return out_dir


def ensure_model(recipe: ModelRecipe | str, registry: Registry | None = None) -> Entry:
    """Return the registry entry for ``recipe``, building and registering it if missing."""
    if isinstance(recipe, str):
        recipe = DEMO_RECIPES[recipe]
    registry = registry or Registry()
    key = recipe.hash()
    found = registry.find_by_recipe(recipe.name, key)
    if found is not None:
        return found
    logger.info("building model %s (recipe %s) ...", recipe.name, key)
    with tempfile.TemporaryDirectory(prefix="homefire-build-") as tmp:
        build_model(recipe, Path(tmp) / recipe.name)
        entry = registry.register(
            recipe.name, Path(tmp) / recipe.name, kind="base",
            config={"recipe": dataclasses.asdict(recipe)}, run="homefire models build", recipe_hash=key,
        )
        shutil.rmtree(Path(tmp) / recipe.name, ignore_errors=True)
    return entry


def _with_convert_hint(err: ModelNotFound, source: str) -> ModelNotFound:
    """A missing ``<model>-<format>`` entry (e.g. demo-onnx-int4) is one `homefire models convert` away: say so."""
    from homefire.convert import TARGETS

    for to in TARGETS:
        base = source.removesuffix(f"-{to}")
        if base != source and base:
            return ModelNotFound(
                f"model '{source}' is not in the registry yet. Fix: homefire models convert {base} --to {to}"
            )
    return err


def resolve_source(source: str, registry: Registry | None = None) -> tuple[str, Entry | None]:
    """(what to load, its registry entry or None) for a demo name, registry ref, directory or hub id.

    A demo model is built on first use; a bare name means its newest version, so once
    ``homefire models build-demo`` has pretrained it, serve and train use the pretrained one.
    """
    registry = registry or Registry()
    if source in DEMO_RECIPES and not Path(source).is_dir():
        if not registry.versions(source):
            ensure_model(DEMO_RECIPES[source], registry)
            logger.warning("%s has random weights; `homefire models build-demo` pretrains it", source)
        entry = registry.get(source)
        return entry.path, entry
    try:
        path = registry.resolve_source(source)
    except ModelNotFound as err:
        raise _with_convert_hint(err, source) from None
    if "/" not in source and not Path(source).expanduser().is_dir():
        return path, registry.get(source)
    return path, None
