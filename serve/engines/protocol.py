"""The engine protocol: what a model replica needs from an inference engine.

Every engine (vLLM first; llama.cpp and ONNX Runtime for CPU-optimised variants; the
mock engine for tests of the layers above) implements :class:`Engine`. The OpenAI layer
(:mod:`homefire.serve.serving`) is engine-agnostic: it renders prompts with the engine's
:class:`Tokenizer` (a GGUF file carries its own; the others read the model directory),
refuses what the engine's :class:`Capabilities` say it cannot do with a 400 naming the
field, validates lengths, and turns :class:`Delta` streams into OpenAI responses.

Streaming contract
    ``generate`` is an async iterator of :class:`Delta`. Each delta carries the *new*
    text and token count of one choice (``index``); the last delta of a choice has
    ``finish_reason`` set (``"stop"`` or ``"length"``). Stop strings are applied by the
    engine and never appear in ``text``. Cancelling the iterator (the client went away)
    must abort the request in the engine.

Error contract
    Bad input the engine detects raises :class:`homefire.errors.InvalidRequest` with
    ``param`` naming the field; an unknown adapter raises ``AdapterNotFound``; anything
    else raises ``EngineError``. ``start`` raises ``EngineStartTimeout`` past its timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from homefire.errors import AdapterNotFound, InvalidRequest


#: The most top tokens ``Engine.score`` returns per position (vLLM's default ``max_logprobs``).
MAX_SCORE_TOP_K = 20


@dataclass
class SamplingSpec:
    """Engine-neutral sampling parameters (validated by the OpenAI layer before they get here)."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    #: Generate at least this many tokens before a stop condition may end the text.
    min_tokens: int = 0
    #: Keep generating past the end-of-sequence token (benchmarks).
    ignore_eos: bool = False
    #: A JSON schema the output must follow (structured output), or None.
    json_schema: dict | None = None
    #: Any valid JSON object (``response_format: json_object``).
    json_object: bool = False


@dataclass
class Scores:
    """What a model thinks of a text: for each position i = 1 .. n-1 of ``token_ids``, the log-probability of
    ``token_ids[i]`` given ``token_ids[:i]``, and (when asked) the ``top_k`` most likely tokens there."""

    logprobs: list[float]
    #: One ``{token id: logprob}`` per position, the ``top_k`` most likely; empty when ``top_k`` was 0.
    top: list[dict[int, float]] = field(default_factory=list)

    @classmethod
    def from_logits(cls, logits: Any, targets: Any, top_k: int = 0) -> "Scores":
        """From raw logits ``[n, vocab]`` (numpy) of the positions that predict ``targets`` ``[n]``."""
        import numpy as np

        rows = np.asarray(logits, dtype=np.float64)
        peak = rows.max(axis=1, keepdims=True)
        logp = rows - (peak + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True)))
        targets = np.asarray(targets)
        out = cls(logp[np.arange(len(targets)), targets].tolist())
        if top_k:
            best = np.argpartition(-logp, top_k - 1, axis=1)[:, :top_k]
            out.top = [{int(t): float(row[t]) for t in ids} for row, ids in zip(logp, best)]
        return out

    def extend(self, other: "Scores") -> None:
        self.logprobs += other.logprobs
        self.top += other.top


def check_score_request(token_ids: list[int], top_k: int, max_tokens: int) -> None:
    """InvalidRequest unless 2 <= len(token_ids) <= max_tokens and 0 <= top_k <= MAX_SCORE_TOP_K."""
    if not 2 <= len(token_ids) <= max_tokens:
        raise InvalidRequest(f"score needs 2 to {max_tokens} tokens, got {len(token_ids)}. Fix: score shorter windows",
                             param="prompt")
    if not 0 <= top_k <= MAX_SCORE_TOP_K:
        raise InvalidRequest(f"top_k {top_k} is outside 0..{MAX_SCORE_TOP_K}", param="top_k")


@dataclass
class Delta:
    """New output of one choice."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    #: Prompt tokens the engine found in its prefix cache (the request's, on every delta); None: not reported.
    cached_tokens: int | None = None


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do beyond plain sampling; the OpenAI layer refuses the rest with a 400."""

    #: Serves LoRA adapters (`model: name:adapter`).
    lora: bool = False
    #: Constrains output to a JSON schema / any JSON object (`response_format`).
    structured_output: bool = False
    #: More than one choice per request (`n > 1`).
    n: bool = True
    #: `presence_penalty` / `frequency_penalty`.
    penalties: bool = True
    #: `min_tokens` and `ignore_eos` (vLLM extensions; benchmark clients send them).
    min_tokens: bool = True
    #: Brings its own OpenAI layer (``Engine.openai_layer``) for what homefire's request models do not cover: the
    #: ingress sends it those requests (:class:`homefire.serve.protocol.NativeRequest`) instead of refusing them.
    native_openai: bool = False


class Tokenizer(Protocol):
    """Text <-> token ids and chat rendering, as the engine that serves the model sees them."""

    #: Number of token ids the model accepts.
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` through the model's chat template, ending with the assistant's turn.

        Raises InvalidRequest (param ``messages``) when the model has no template or the template refuses them.
        """
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """An inference engine living inside one Serve replica."""

    #: Context length in tokens (prompt + completion).
    max_model_len: int
    #: What the engine can do; the OpenAI layer checks requests against it.
    capabilities: Capabilities
    #: The model's tokenizer as this engine sees it (valid once ``start`` returned).
    tokenizer: Tokenizer

    async def start(self, timeout_s: float) -> None:
        """Load the model; raise EngineStartTimeout after ``timeout_s``."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec, adapter: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream deltas for ``sampling.n`` choices of one prompt."""

    async def score(self, token_ids: list[int], top_k: int = 0) -> Scores:
        """Log-probabilities of ``token_ids[i]`` given ``token_ids[:i]`` for i = 1 .. n-1, and the ``top_k`` most
        likely tokens at each position: the model's own view of a text, so perplexity (``exp(-mean)``), agreement and
        divergence are measured on the engine that serves the variant. At most :data:`MAX_SCORE_TOP_K` top tokens."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Make a LoRA adapter servable under ``name``."""

    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``."""

    def adapters(self) -> list[str]:
        """Names of loaded adapters."""
        ...

    def adapter_path(self, name: str) -> str | None:
        """Where loaded adapter ``name`` came from (None when not loaded)."""

    def stats(self) -> dict[str, Any]:
        """Engine-level gauges (running / waiting requests, KV usage ...)."""

    async def shutdown(self) -> None:
        """Release the engine's processes and memory."""

    # An engine with ``capabilities.native_openai`` also has ``async def openai_layer()``: an object whose
    # ``respond(NativeRequest, adapter, stream_interval_s)`` answers with the serving protocol of
    # :class:`homefire.serve.serving.OpenAIServing` (see :mod:`homefire.serve.engines.vllm_openai`).


class NoAdapters:
    """The adapter half of :class:`Engine` for engines that serve no LoRA adapters (``capabilities.lora`` False).

    ``engine_label`` names the engine in the errors; ``cfg.name`` is the served model.
    """

    engine_label: str
    cfg: Any

    def refuse_adapter(self, adapter: str | None) -> None:
        """Raise InvalidRequest (param ``model``) when a request names an adapter."""
        if adapter is not None:
            raise self._no_adapters(f"adapter '{adapter}' was asked of '{self.cfg.name}'")

    def _no_adapters(self, what: str) -> InvalidRequest:
        return InvalidRequest(
            f"{what}, but {self.engine_label} serves no LoRA adapters. Fix: use the base model name, or serve the "
            "adapter's model with engine vllm (max_loras > 0)",
            param="model",
        )

    async def load_adapter(self, name: str, path: str) -> None:
        raise self._no_adapters(f"model '{self.cfg.name}' cannot load adapter '{name}'")

    async def unload_adapter(self, name: str) -> None:
        raise AdapterNotFound(f"adapter '{name}' is not loaded on '{self.cfg.name}' ({self.engine_label} serves none)")

    def adapters(self) -> list[str]:
        return []

    def adapter_path(self, name: str) -> str | None:
        return None
