"""The OpenAI layer on top of any engine: prompt rendering, length checks, response shapes.

It runs inside the model replica, next to the engine, so that tokens are turned into
SSE bytes once and travel to the client in as few hops as possible. Output is a stream
of ``str`` items (SSE text or a JSON body), opened by ``ACCEPTED`` once the request passed its checks and
closed by one ``dict``: the request's stats,
which the ingress records as metrics and never forwards.

Streaming chunks are batched in time: the first chunk leaves at once (TTFT is untouched),
later ones leave every ``stream_interval_s``. Each hop through Ray costs CPU per item, so
batching is what keeps the stack close to a bare engine under load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from homefire.errors import EngineError, HomefireError, InvalidRequest
from homefire.serve.engines.protocol import Delta, Engine, SamplingSpec
from homefire.serve.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
_DONE = "data: [DONE]\n\n"
#: First item of every response: the request passed its checks and reached the engine.
ACCEPTED = ""
_dumps = json.dumps


def _sse(obj: dict) -> str:
    return f"data: {_dumps(obj, separators=(',', ':'))}\n\n"


class OpenAIServing:
    """Turns validated OpenAI requests into engine calls and engine deltas into OpenAI responses."""

    def __init__(self, model_name: str, engine: Engine, stream_interval_s: float = 0.0):
        self.model_name = model_name
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.stream_interval_s = stream_interval_s
        self.vocab_size = self.tokenizer.vocab_size

    # ------------------------------------------------------------------ prompts
    def render_chat(self, req: ChatCompletionRequest) -> list[int]:
        return self.tokenizer.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])

    def render_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(
                    f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", param="prompt"
                )
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) else prompt
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidRequest("prompt: the text encodes to no tokens; send some text", param="prompt")
        return ids

    def check_capabilities(self, req: ChatCompletionRequest | CompletionRequest, adapter: str | None) -> None:
        """Refuse with a 400 naming the field what this model's engine cannot do (instead of ignoring it)."""
        caps = self.engine.capabilities
        fmt = getattr(req, "response_format", None)
        refused = [
            ("model", adapter is not None and not caps.lora, "LoRA adapters"),
            ("n", req.n > 1 and not caps.n, "n > 1"),
            ("response_format", fmt is not None and fmt.type != "text" and not caps.structured_output,
             "structured output"),
            ("presence_penalty", req.presence_penalty != 0 and not caps.penalties, "presence_penalty"),
            ("frequency_penalty", req.frequency_penalty != 0 and not caps.penalties, "frequency_penalty"),
            ("min_tokens", req.min_tokens > 0 and not caps.min_tokens, "min_tokens"),
            ("ignore_eos", req.ignore_eos and not caps.min_tokens, "ignore_eos"),
        ]
        for param, bad, what in refused:
            if bad:
                raise InvalidRequest(
                    f"{param}: model '{self.model_name}' runs on an engine without {what}; "
                    "remove the field or send the request to a model served by vLLM",
                    param=param, code="unsupported_by_engine",
                )

    def sampling(self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int, field: str) -> SamplingSpec:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise InvalidRequest(
                f"this model's maximum context length is {limit} tokens, but the {field} use {prompt_len} tokens; "
                f"shorten the {field}",
                param=field, code="context_length_exceeded",
            )
        requested = req.token_limit()
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if requested is None:
            requested = limit - prompt_len
        elif prompt_len + requested > limit:
            raise InvalidRequest(
                f"this model's maximum context length is {limit} tokens; you asked for {prompt_len + requested} "
                f"({prompt_len} in the {field}, {requested} in the completion). Lower {param} to at most "
                f"{limit - prompt_len}",
                param=param, code="context_length_exceeded",
            )
        fmt = getattr(req, "response_format", None)
        return SamplingSpec(
            max_tokens=requested, n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=req.seed, stop=list(req.stop or []), presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            min_tokens=min(req.min_tokens, requested), ignore_eos=req.ignore_eos,
            json_schema=fmt.json_schema.schema_ if fmt is not None and fmt.type == "json_schema" else None,
            json_object=fmt is not None and fmt.type == "json_object",
        )

    # ------------------------------------------------------------------ entry points
    async def chat(self, req: ChatCompletionRequest, adapter: str | None = None) -> AsyncIterator[str | dict]:
        received = time.perf_counter()
        ids = self.render_chat(req)
        shapes = (self._chat_stream, self._chat_full)
        async for item in self._respond(req, ids, "messages", "chatcmpl", shapes, adapter, received):
            yield item

    async def completion(self, req: CompletionRequest, adapter: str | None = None) -> AsyncIterator[str | dict]:
        received = time.perf_counter()
        ids = self.render_prompt(req)
        shapes = (self._text_stream, self._text_full)
        async for item in self._respond(req, ids, "prompt", "cmpl", shapes, adapter, received):
            yield item

    async def _respond(self, req, ids: list[int], field: str, prefix: str, shapes, adapter, received: float):
        self.check_capabilities(req, adapter)
        spec = self.sampling(req, len(ids), field)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        yield ACCEPTED
        stream = self.engine.generate(rid, ids, spec, adapter)
        st = new_stats(len(ids))
        body = shapes[0](req, rid, stream, st) if req.stream else shapes[1](req, rid, stream, st)
        async for item in timed(body, received, st, req.stream, self.stream_interval_s):
            yield item

    # ------------------------------------------------------------------ shapes
    async def _chat_stream(self, req, rid, stream: AsyncIterator[Delta], st: dict):
        created = int(time.time())
        head = f'data: {{"id":"{rid}","object":"chat.completion.chunk","created":{created},"model":{_dumps(req.model)},"choices":['
        # The role chunks leave with the first tokens: until the engine produced something, nothing was sent, so a
        # request whose engine dies first can still be retried elsewhere.
        opening = "".join(
            f'{head}{{"index":{i},"delta":{{"role":"assistant","content":""}},"finish_reason":null}}]}}\n\n'
            for i in range(req.n)
        )
        async for d in stream:
            st["completion_tokens"] += d.num_tokens
            st["cached_tokens"] = d.cached_tokens
            finish = "null" if d.finish_reason is None else f'"{d.finish_reason}"'
            delta = f'{{"content":{_dumps(d.text)}}}' if d.text or d.finish_reason is None else "{}"
            yield f'{opening}{head}{{"index":{d.index},"delta":{delta},"finish_reason":{finish}}}]}}\n\n'
            opening = ""
        yield opening + self._usage_tail(req, rid, created, "chat.completion.chunk", st)

    async def _text_stream(self, req, rid, stream: AsyncIterator[Delta], st: dict):
        created = int(time.time())
        head = f'data: {{"id":"{rid}","object":"text_completion","created":{created},"model":{_dumps(req.model)},"choices":['
        async for d in stream:
            st["completion_tokens"] += d.num_tokens
            st["cached_tokens"] = d.cached_tokens
            finish = "null" if d.finish_reason is None else f'"{d.finish_reason}"'
            yield f'{head}{{"index":{d.index},"text":{_dumps(d.text)},"logprobs":null,"finish_reason":{finish}}}]}}\n\n'
        yield self._usage_tail(req, rid, created, "text_completion", st)

    def _usage_tail(self, req, rid, created, obj, st: dict) -> str:
        tail = ""
        if req.stream_options is not None and req.stream_options.include_usage:
            tail = _sse({
                "id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                "usage": _usage(st["prompt_tokens"], st["completion_tokens"], st["cached_tokens"]),
            })
        return tail + _DONE

    async def _collect(self, stream: AsyncIterator[Delta], n: int, st: dict) -> tuple[list[list[str]], list[str | None], int]:
        texts: list[list[str]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        tokens = 0
        async for d in stream:
            texts[d.index].append(d.text)
            tokens += d.num_tokens
            st["cached_tokens"] = d.cached_tokens
            if d.finish_reason is not None:
                finish[d.index] = d.finish_reason
        return texts, finish, tokens

    async def _chat_full(self, req, rid, stream, st: dict):
        texts, finish, tokens = await self._collect(stream, req.n, st)
        st["completion_tokens"] = tokens
        yield _dumps({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": "".join(t)}, "logprobs": None,
                 "finish_reason": finish[i] or "stop"}
                for i, t in enumerate(texts)
            ],
            "usage": _usage(st["prompt_tokens"], tokens, st["cached_tokens"]),
        })

    async def _text_full(self, req, rid, stream, st: dict):
        texts, finish, tokens = await self._collect(stream, req.n, st)
        st["completion_tokens"] = tokens
        yield _dumps({
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model,
            "choices": [
                {"index": i, "text": "".join(t), "logprobs": None, "finish_reason": finish[i] or "stop"}
                for i, t in enumerate(texts)
            ],
            "usage": _usage(st["prompt_tokens"], tokens, st["cached_tokens"]),
        })


async def timed(body: AsyncIterator[str], received: float, stats: dict, streaming: bool, interval: float):
    """Forward ``body`` batched in time (:func:`batched`), recording TTFT and inter-chunk times; then yield ``stats``."""
    last = None
    async for chunk in batched(body, streaming, interval):
        now = time.perf_counter()
        if last is None:  # the first chunk carries the first tokens
            stats["ttft_s"] = now - received
        else:
            stats["itl_s"].append(now - last)
        last = now
        yield chunk
    yield stats


async def batched(body: AsyncIterator[str], streaming: bool, interval: float) -> AsyncIterator[str]:
    """``body``'s chunks, those of a stream joined so that one leaves at most every ``interval`` seconds (the first at
    once). A failure before anything was sent raises (the ingress answers with its status); after, it ends the stream
    with an error event."""
    if not streaming or interval <= 0:
        sent = False
        try:
            async for chunk in body:
                yield chunk
                sent = True
        except Exception as err:
            if not (streaming and sent):
                raise _as_error(err) from err
            yield _error_event(err)
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump():
        try:
            async for chunk in body:
                queue.put_nowait(chunk)
            queue.put_nowait(end)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # handed to the consumer, which reports it in-stream
            queue.put_nowait(err)

    task = asyncio.create_task(pump())
    try:
        first = True
        while True:
            item = await queue.get()
            parts = []
            while True:
                if item is end or isinstance(item, BaseException):
                    break
                parts.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if parts:
                yield "".join(parts)
            if item is end:
                return
            if isinstance(item, BaseException):
                if first and not parts:
                    raise _as_error(item) from item
                yield _error_event(item)
                return
            if not first:
                await asyncio.sleep(interval)
            first = False
    finally:
        task.cancel()


def _as_error(err: BaseException) -> HomefireError:
    """A homefire error as is; anything else as a short EngineError (the details go to the replica's log)."""
    if isinstance(err, HomefireError):
        return err
    logger.error("generation failed", exc_info=err)
    return EngineError(f"generation failed ({type(err).__name__}); the server log has the details")


def _error_event(err: BaseException) -> str:
    """A failure after the stream started: one error event, then [DONE] (never a half-closed stream)."""
    return _sse(_as_error(err).to_openai()) + _DONE


def new_stats(prompt_len: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_len, "completion_tokens": 0, "cached_tokens": None, "ttft_s": None, "itl_s": []}


def _usage(prompt: int, completion: int, cached: int | None = None) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` where the engine reports its prefix cache."""
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage
