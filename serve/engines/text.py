"""Text on the engine side of the seam: a Hugging Face tokenizer behind the :class:`Tokenizer`
protocol, and the incremental detokenizer with stop strings that engines without their own
(ONNX Runtime, llama.cpp) share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from homefire.errors import InvalidRequest

#: Decode at most this many trailing tokens again per step (plus a few of context, so that a
#: SentencePiece word boundary decodes as it does in the full text).
_WINDOW = 8
_CONTEXT = 4


class HFTokenizer:
    """A model directory's Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)."""

    def __init__(self, path: str, trust_remote_code: bool = False, name: str = "model"):
        from transformers import AutoTokenizer

        self.name = name
        self._tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.vocab_size = len(self._tok)
        self.eos_token_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise InvalidRequest(
                f"model '{self.name}' has no chat template; use /v1/completions with a plain prompt", param="messages"
            )
        try:
            text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # a template may reject a role order (e.g. two system messages)
            raise InvalidRequest(f"the model's chat template rejected the messages: {err}", param="messages") from err
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class IncrementalText:
    """Token ids in, new text out: holds back half-decoded characters and anything that may still
    become a stop string, and reports when a stop string (never emitted) ends the text.

    Args:
        decode: ids -> text (special tokens skipped).
        stop: stop strings; the text ends before the first one found.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None):
        self._decode = decode
        self._stop = [s for s in stop or [] if s]
        self._ids: list[int] = []
        self._text = ""  # the text of all ids decoded so far
        self._fixed_ids = 0  # ids whose text can no longer change ...
        self._fixed_text = ""  # ... and that text
        self._ctx = 0  # decoding restarts here: a few fixed ids before _fixed_ids
        self._ctx_text = ""  # text of _ids[_ctx:_fixed_ids]
        self._sent = 0  # characters of the text already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to emit."""
        self._ids.append(token_id)
        tail = self._decode(self._ids[self._ctx:])
        if tail.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self._text = self._fixed_text + tail[len(self._ctx_text):]
        if len(self._ids) - self._fixed_ids > _WINDOW:  # keep each decode short
            self._fixed_ids, self._fixed_text = len(self._ids), self._text
            self._ctx = max(0, self._fixed_ids - _CONTEXT)
            self._ctx_text = self._decode(self._ids[self._ctx:self._fixed_ids])
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._text
        if self._stop:
            start = max(0, self._sent - max(len(s) for s in self._stop))
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                out, self._sent = text[self._sent:min(hits)], min(hits)
                return out
            if not final:
                hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                end = max(self._sent, len(text) - hold)
                out, self._sent = text[self._sent:end], end
                return out
        out, self._sent = text[self._sent:], len(text)
        return out
