"""The llama.cpp engine: GGUF files on CPU through llama-cpp-python.

Serves a ``gguf`` registry entry (``homefire models convert demo --to gguf-q8_0``) or a ``.gguf``
file. The GGUF carries its own tokenizer and chat template, so the engine needs nothing else.
The only module in homefire that imports ``llama_cpp``.

How it runs: ``slots`` independent llama.cpp contexts (one request at a time each, each with a
KV cache of ``max_model_len`` tokens), lent out through an asyncio queue. A choice is decoded in
a worker thread, one token per step, with a llama.cpp sampler chain built from the request;
tokens come back to the event loop through ``call_soon_threadsafe``. Closing the stream sets an
event the worker checks before each token, so an abandoned request frees its slot within one
token. A slot keeps its KV cache between requests and reuses the longest common prefix, so the
``n`` choices of one prompt (run one after another) evaluate the prompt once.

Example serve config entry::

    models:
      - name: tiny-q8
        source: demo-tiny-gguf-q8_0
        engine: llamacpp
        threads: 4
        slots: 2
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import math
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from homefire.errors import (
    ConfigError, EngineError, EngineStartTimeout, HomefireError, InvalidRequest,
)
from homefire.serve.config import LlamaCppModelConfig
from homefire.serve.engines.protocol import (
    Capabilities, Delta, NoAdapters, SamplingSpec, Scores, check_score_request,
)
from homefire.serve.engines.text import IncrementalText

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'homefire[llamacpp]'"
#: Most seconds shutdown waits for workers (each stops within one token of being told).
_SHUTDOWN_WAIT_S = 30.0


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as err:
        raise ConfigError(f"the llama.cpp engine needs llama-cpp-python ({err}). Fix: {_INSTALL_HINT}") from err
    return llama_cpp


def gguf_file(model_path: str | Path) -> Path:
    """The GGUF file a model path names: the file itself, or the one ``*.gguf`` in a directory.

    Raises:
        ConfigError: no GGUF there, or several (the engine would not know which to serve).
    """
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if found:
            raise ConfigError(
                f"{path} holds {len(found)} .gguf files ({', '.join(p.name for p in found)}). "
                "Fix: point `source` at one of them"
            )
    raise ConfigError(
        f"{path} is not a .gguf file or a directory holding one. Fix: convert the model first "
        "(homefire models convert <model> --to gguf-q8_0) and serve that entry"
    )


class GGUFTokenizer:
    """The tokenizer and chat template inside a GGUF file, behind the :class:`Tokenizer` protocol.

    Args:
        llm: a ``llama_cpp.Llama`` (``vocab_only`` is enough).
        name: the served model's name, for error messages.
    """

    def __init__(self, llm: Any, name: str = "model"):
        self._llm = llm
        self.name = name
        self.vocab_size: int = llm.n_vocab()
        self.bos_token_id: int = llm.token_bos()
        self.eos_token_id: int = llm.token_eos()
        self.chat_template: str | None = llm.metadata.get("tokenizer.chat_template")
        self._template: Any = None
        self._pieces: list[bytes] | None = None  # bytes of each token id, special tokens as b""

    def encode(self, text: str) -> list[int]:
        # special=True: special-token text in the input becomes the special token, as Hugging Face tokenizers do.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []

    def decode(self, ids: list[int]) -> str:
        if self._pieces is None:
            self._pieces = [self._piece(t, special=False) for t in range(self.vocab_size)]
        return b"".join(self._pieces[t] for t in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """The text of one token, special tokens included (``<|end|>``)."""
        return self._piece(token_id, special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""

    def _piece(self, token_id: int, special: bool) -> bytes:
        # Not Llama.detokenize nor llama_detokenize: llama-cpp-python 0.3.36 gives each token a 32-byte buffer and
        # silently drops longer pieces, and llama.cpp's detokenize "cleans" spaces for BPE vocabularies (" ," -> ",")
        # where Hugging Face's tokenizer does not, so text would differ from the model's own tokenizer.
        lc = _llama_cpp()
        size = 64
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_token_to_piece(self._llm._model.vocab, token_id, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # too small: llama.cpp says how much it needs
        raise EngineError(f"llama.cpp could not render token {token_id}")

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.chat_template:
            raise InvalidRequest(
                f"model '{self.name}' has no chat template in its GGUF (tokenizer.chat_template); "
                "use /v1/completions with a plain prompt",
                param="messages",
            )
        try:
            text = self._compiled().render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.token_text(self.bos_token_id), eos_token=self.token_text(self.eos_token_id),
            )
        except Exception as err:  # a template may reject a role order (raise_exception) or fail to compile
            raise InvalidRequest(f"the model's chat template rejected the messages: {err}", param="messages") from err
        return self.encode(text)

    def _compiled(self) -> Any:
        # The same sandbox and options transformers' apply_chat_template uses, so templates render identically.
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                       separators: Any = None, sort_keys: bool = False) -> str:
                return json.dumps(
                    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
                )

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template


@dataclass
class _End:
    """A worker's last word on a choice."""

    reason: str
    #: Tokens generated but not sent as ids (the end-of-sequence token).
    tokens: int = 0


@dataclass
class _Job:
    """One choice handed to a worker thread."""

    prompt: list[int]
    sampling: SamplingSpec
    seed: int
    grammar: str | None
    emit: Callable[[Any], None]
    cancel: threading.Event


class _SamplerChain:
    """A llama.cpp sampler chain for one choice, ordered as vLLM applies the same parameters: penalties,
    grammar, temperature, then top-k / top-p on the tempered distribution.

    The end-of-generation tokens are banned (a logit bias of -inf at the head of the chain) while ``min_tokens``
    is not reached or ``ignore_eos`` is set. The repetition penalty sees prompt and output (as in vLLM); the
    presence and frequency penalties see the output only.
    """

    def __init__(self, lc: Any, llm: Any, job: _Job, eog_ids: frozenset[int], n_ctx: int):
        s = job.sampling
        self._lc = lc
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        n_vocab = llm.n_vocab()
        # A grammar decides itself when the text may end; banning the end under it could leave no legal token.
        self.banned = bool(eog_ids) and job.grammar is None and (s.ignore_eos or s.min_tokens > 0)
        if self.banned:
            bias = (lc.llama_logit_bias * len(eog_ids))(*[lc.llama_logit_bias(t, -math.inf) for t in sorted(eog_ids)])
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_logit_bias(n_vocab, len(eog_ids), bias))
        if s.repetition_penalty != 1.0:
            lc.llama_sampler_chain_add(
                self.chain, lc.llama_sampler_init_penalties(n_vocab, n_ctx, s.repetition_penalty, 0.0, 0.0)
            )
            for t in job.prompt:  # accepted before the grammar joins the chain, which must see the output only
                lc.llama_sampler_accept(self.chain, t)
        if s.frequency_penalty or s.presence_penalty:
            lc.llama_sampler_chain_add(
                self.chain,
                lc.llama_sampler_init_penalties(n_vocab, n_ctx, 1.0, s.frequency_penalty, s.presence_penalty),
            )
        if job.grammar is not None:
            grammar = lc.llama_sampler_init_grammar(llm._model.vocab, job.grammar.encode(), b"root")
            if not grammar:
                self.free()
                raise InvalidRequest("llama.cpp could not compile the response_format schema", param="response_format")
            lc.llama_sampler_chain_add(self.chain, grammar)
        if s.temperature < 1e-5:  # vLLM's threshold for greedy
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_temp(s.temperature))
            if s.top_k > 0:
                lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_p(s.top_p, 1))
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_dist(job.seed))

    def sample(self, llm: Any) -> int:
        """Sample the next token from the context's last logits (and record it in the chain's state)."""
        return int(self._lc.llama_sampler_sample(self.chain, llm.ctx, -1))

    def allow_end(self) -> None:
        """Lift the ban on the end-of-generation tokens."""
        if self.banned:
            self._lc.llama_sampler_free(self._lc.llama_sampler_chain_remove(self.chain, 0))
            self.banned = False

    def free(self) -> None:
        if self.chain is not None:
            self._lc.llama_sampler_free(self.chain)
            self.chain = None


class LlamaCppEngine(NoAdapters):
    """llama.cpp behind the homefire engine protocol.

    Args:
        cfg: the served model's settings (``threads``, ``batch_tokens``, ``slots``, ``max_model_len``).
        model_path: a ``.gguf`` file or a directory holding exactly one.
    """

    capabilities = Capabilities(lora=False, structured_output=True, n=True, penalties=True, min_tokens=True)
    engine_label = "llama.cpp"

    def __init__(self, cfg: LlamaCppModelConfig, model_path: str):
        self.cfg = cfg
        self.path = gguf_file(model_path)
        self.max_model_len: int = cfg.max_model_len or 0
        self.tokenizer: GGUFTokenizer | None = None
        self._slots: list[Any] = []
        self._free: asyncio.Queue | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._eog_ids: frozenset[int] = frozenset()
        self._running = 0
        self._closing = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, timeout_s: float) -> None:
        _llama_cpp()  # fail fast, with the install hint, before any thread starts
        abort = threading.Event()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._load, abort), timeout_s)
        except asyncio.TimeoutError:
            abort.set()  # the loading thread stops before its next slot
            raise EngineStartTimeout(
                f"llama.cpp engine for '{self.cfg.name}' did not load {self.path.name} ({self.cfg.slots} slot(s)) "
                f"within {timeout_s:.0f}s; fix: raise HOMEFIRE_ENGINE_START_TIMEOUT_S or lower `slots`"
            ) from None
        self._free = asyncio.Queue()
        for slot in self._slots:
            self._free.put_nowait(slot)
        self._executor = ThreadPoolExecutor(
            max_workers=len(self._slots), thread_name_prefix=f"llamacpp-{self.cfg.name}"
        )
        logger.info(
            "llama.cpp engine for %s: %s, %d slot(s) of %d tokens", self.cfg.name, self.path.name, len(self._slots),
            self.max_model_len,
        )

    def _load(self, abort: threading.Event) -> None:
        lc = _llama_cpp()
        threads = self.cfg.threads or int(self.cfg.cpus) or 1
        n_ctx = self.cfg.max_model_len or 0  # 0: the context length the GGUF was trained for
        slots: list[Any] = []
        for _ in range(self.cfg.slots):
            if abort.is_set():
                return
            n_batch = min(self.cfg.batch_tokens, n_ctx or self.cfg.batch_tokens)
            try:
                llm = lc.Llama(
                    str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_batch,
                    n_ubatch=n_batch, verbose=False,
                )
            except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
                raise EngineError(f"llama.cpp cannot load {self.path}: {err}. Fix: re-convert the model") from err
            n_ctx = llm.n_ctx()
            slots.append(llm)
        # Tokenizing reads only the vocabulary, never a context, so the first slot's model serves the event loop too.
        vocab = slots[0]._model.vocab
        self._eog_ids = frozenset(t for t in range(slots[0].n_vocab()) if lc.llama_vocab_is_eog(vocab, t))
        self.tokenizer = GGUFTokenizer(slots[0], self.cfg.name)
        self.max_model_len = n_ctx
        self._slots = slots

    async def check_health(self) -> None:
        if not self._slots or self._closing.is_set():
            raise EngineError(f"llama.cpp engine for '{self.cfg.name}' is not started")

    async def shutdown(self) -> None:
        self._closing.set()  # every worker stops before its next token
        if self._executor is not None:
            await asyncio.wait_for(asyncio.to_thread(self._executor.shutdown, wait=True), _SHUTDOWN_WAIT_S)
            self._executor = None
        for llm in self._slots:
            llm.close()
        self._slots = []

    def stats(self) -> dict[str, Any]:
        return {
            "unfinished_requests": self._running,
            "slots": len(self._slots),
            "slots_free": self._free.qsize() if self._free is not None else 0,
        }

    # -- generation ------------------------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec, adapter: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream ``sampling.n`` choices, one after another (see the protocol's streaming contract)."""
        self.refuse_adapter(adapter)
        await self.check_health()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty; llama.cpp needs at least one token", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt_token_ids)} tokens; '{self.cfg.name}' holds {self.max_model_len} "
                "(prompt and completion). Fix: shorten the prompt",
                param="prompt",
            )
        grammar = self._grammar(sampling)
        self._running += 1
        try:
            for index in range(sampling.n):
                seed = (sampling.seed + index if sampling.seed is not None else random.getrandbits(31)) & 0x7FFFFFFF
                async with aclosing(self._choice(index, prompt_token_ids, sampling, seed, grammar)) as choice:
                    async for delta in choice:
                        yield delta
        finally:
            self._running -= 1

    def _grammar(self, s: SamplingSpec) -> str | None:
        """The GBNF grammar for the request's response_format (None for free text)."""
        if s.json_schema is None and not s.json_object:
            return None
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        schema = s.json_schema if s.json_schema is not None else {"type": "object"}
        try:
            # Its whitespace rule is bounded, unlike the stock JSON grammar's: a weak model cannot loop on spaces.
            return json_schema_to_gbnf(json.dumps(schema))
        except Exception as err:  # the converter raises bare Exceptions / ValueErrors on schema it cannot express
            raise InvalidRequest(
                f"llama.cpp cannot turn this JSON schema into a grammar: {err}", param="response_format"
            ) from err

    async def _choice(
        self, index: int, prompt: list[int], s: SamplingSpec, seed: int, grammar: str | None
    ) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        job = _Job(prompt, s, seed, grammar, lambda item: loop.call_soon_threadsafe(out.put_nowait, item),
                   threading.Event())
        slot = await self._free.get()
        self._submit(loop, slot, self._decode, job)
        text = IncrementalText(self.tokenizer.decode, s.stop)
        pending = 0  # tokens not yet reported in a delta
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    if isinstance(item, HomefireError):
                        raise item
                    raise EngineError(f"llama.cpp failed while generating for '{self.cfg.name}': {item}") from item
                if isinstance(item, _End):
                    yield Delta(index, text.flush(), pending + item.tokens, item.reason)
                    return
                pending += 1
                piece = text.push(item)
                if text.stopped:
                    yield Delta(index, piece, pending, "stop")
                    return
                if piece:
                    yield Delta(index, piece, pending)
                    pending = 0
        finally:
            job.cancel.set()  # finished, stopped by a stop string, or abandoned: the worker ends within a token

    def _submit(self, loop: asyncio.AbstractEventLoop, slot: Any, work: Callable[[Any, Any], Any], arg: Any):
        """Run ``work(slot, arg)`` on a worker thread; the slot goes back to the pool when the thread is done."""

        def run() -> Any:
            try:
                return work(slot, arg)
            except BaseException:
                slot.n_tokens = 0  # the slot's cache may be half-written: trust none of it
                raise
            finally:
                try:
                    loop.call_soon_threadsafe(self._free.put_nowait, slot)
                except RuntimeError:  # the event loop is closed: nobody is left to lend the slot to
                    pass

        try:
            return self._executor.submit(run)
        except RuntimeError:  # the executor is shut down
            self._free.put_nowait(slot)
            raise EngineError(f"llama.cpp engine for '{self.cfg.name}' is shutting down") from None

    def _decode(self, llm: Any, job: _Job) -> None:
        """Worker thread: decode one choice on ``llm``, emitting token ids and then an :class:`_End`."""
        try:
            job.emit(self._decode_tokens(llm, job))
        except BaseException as err:  # handed to the event loop, which raises it in the request
            llm.n_tokens = 0
            job.emit(err)

    def _decode_tokens(self, llm: Any, job: _Job) -> _End:
        lc = _llama_cpp()
        s, prompt = job.sampling, job.prompt
        # Reuse the cached prefix this slot shares with the prompt; evaluate at least one token for fresh logits.
        cached = llm.input_ids[: min(llm.n_tokens, len(prompt) - 1)]
        differ = np.flatnonzero(cached != np.asarray(prompt[: len(cached)]))
        llm.n_tokens = int(differ[0]) if len(differ) else len(cached)
        llm.eval(prompt[llm.n_tokens:])  # drops the cache past n_tokens first
        budget = min(s.max_tokens, self.max_model_len - len(prompt))
        chain = _SamplerChain(lc, llm, job, self._eog_ids, self.max_model_len)
        try:
            n = 0
            while True:
                if self._closing.is_set():
                    raise EngineError(f"llama.cpp engine for '{self.cfg.name}' shut down mid-request; retry")
                if job.cancel.is_set():
                    return _End("abort")  # nobody reads it: the request is gone
                token = chain.sample(llm)
                n += 1
                if token in self._eog_ids:
                    return _End("stop", tokens=1)
                job.emit(token)
                if n >= budget:
                    return _End("length")
                if n >= s.min_tokens and not s.ignore_eos:
                    chain.allow_end()
                llm.eval([token])
        finally:
            chain.free()

    # -- scoring ---------------------------------------------------------------------------------------------------

    async def score(self, token_ids: list[int], top_k: int = 0) -> Scores:
        """Log-probabilities (natural log) of ``token_ids[i]`` given ``token_ids[:i]``, for i = 1 .. n-1, and the
        ``top_k`` most likely tokens at each.

        ``exp(-mean(score(ids).logprobs))`` is the perplexity of the text. Runs on a slot like a request does.

        Raises:
            InvalidRequest: fewer than 2 tokens, more than the context holds, or top_k over MAX_SCORE_TOP_K.
        """
        await self.check_health()
        check_score_request(token_ids, top_k, self.max_model_len)
        loop = asyncio.get_running_loop()
        slot = await self._free.get()
        return await asyncio.wrap_future(self._submit(loop, slot, self._score, (list(token_ids), top_k)))

    def _score(self, llm: Any, request: tuple[list[int], int]) -> Scores:
        ids, top_k = request
        # Llama.eval keeps logits of every position only when the whole context was built with logits_all, which
        # costs n_ctx x n_vocab floats per slot; asking for them per batch (llama-cpp-python 0.3.36 internals) does not.
        n_vocab = llm.n_vocab()
        out = Scores([])
        for start in range(0, len(ids), llm.n_batch):
            chunk = ids[start : start + llm.n_batch]
            llm._ctx.kv_cache_seq_rm(-1, start, -1)
            llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), n_vocab))
            targets = ids[start + 1 : start + 1 + len(chunk)]
            out.extend(Scores.from_logits(logits[: len(targets)], targets, top_k))
        llm.input_ids[: len(ids)] = ids  # the slot's cache now holds ids: a prompt sharing a prefix reuses it
        llm.n_tokens = len(ids)
        return out


__all__ = ["GGUFTokenizer", "LlamaCppEngine", "gguf_file"]
