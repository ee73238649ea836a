"""vLLM's own OpenAI layer inside the model replica, over the engine homefire started.

homefire's lean layer (:mod:`homefire.serve.serving`) answers the common chat and completion requests with the
least CPU per token. Everything else a vLLM model is asked — logprobs, tool calls and their parsers, ``logit_bias``,
batched and echoed prompts, the Responses API, embeddings, vLLM's own extensions — is answered here by vLLM's serving
classes, built exactly as vLLM's server builds them (``init_app_state``), so it behaves as ``vllm serve`` does. This
is how Ray Serve LLM runs vLLM too. homefire keeps the edge: auth, routing, admission, metrics, adapters from its
registry, errors as 4xx naming the field.

With :mod:`homefire.serve.engines.vllm`, the only module that imports vllm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from jinja2 import TemplateError
from pydantic import BaseModel, TypeAdapter, ValidationError

from homefire.errors import EngineError, HomefireError, InvalidRequest, ModelNotFound
from homefire.serve.protocol import IGNORED_FIELDS, NativeRequest, validation_error
from homefire.serve.serving import ACCEPTED, new_stats, timed

logger = logging.getLogger(__name__)
_DONE = "data: [DONE]\n\n"


def _request_types() -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    return {
        "chat": TypeAdapter(ChatCompletionRequest), "completion": TypeAdapter(CompletionRequest),
        "responses": TypeAdapter(ResponsesRequest), "embeddings": TypeAdapter(EmbeddingRequest),
    }


class VLLMOpenAI:
    """vLLM's OpenAI serving objects over one running :class:`~homefire.serve.engines.vllm.VLLMEngine`."""

    def __init__(self, engine: Any, state: Any):
        self.engine = engine
        self.state = state
        self.types = _request_types()
        # vLLM builds the serving objects of its model's tasks only (a pooling model has no chat).
        self.handlers = {
            route: getattr(state, name, None) for route, name in (
                ("chat", "openai_serving_chat"), ("completion", "openai_serving_completion"),
                ("responses", "openai_serving_responses"), ("embeddings", "serving_embedding"),
            )
        }

    @classmethod
    async def create(cls, engine: Any) -> VLLMOpenAI:
        """Build vLLM's serving state the way its server does: its own argument parser (so every frontend default is
        vLLM's), then the engine's own arguments over it, then ``init_app_state`` on the running engine."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        cfg = engine.cfg
        argv = [engine.model_path, "--served-model-name", cfg.name, "--tool-strict-level", cfg.tool_strict_level]
        if cfg.tool_parser is not None:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", cfg.tool_parser]
        frontend = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        own = {k: v for k, v in vars(engine.engine_args).items() if k != "served_model_name"}
        args = argparse.Namespace(**(vars(frontend) | own))
        state = State()
        client = engine.client
        await init_app_state(client, state, args, supported_tasks=await client.get_supported_tasks())
        return cls(engine, state)

    # ------------------------------------------------------------------ one request
    def validate(self, req: NativeRequest) -> Any:
        """The body as vLLM's request model; InvalidRequest naming the field (an unknown one too: vLLM's models would
        accept and ignore it, which hides a typo)."""
        handler = self.handlers[req.route]
        if handler is None:
            what = "an embedding model (serve it with task: generate for this route)" if req.route != "embeddings" \
                else "a text-generation model (serve it with task: embed for /v1/embeddings)"
            raise InvalidRequest(f"model '{self.engine.cfg.name}' is {what}", param="model",
                                 code="unsupported_by_model")
        with self._refusals(req.route):  # vLLM's validators raise its own errors too, and fail on well-typed junk
            try:
                request = self.types[req.route].validate_python(req.body)
            except ValidationError as err:
                raise validation_error(err) from None
        extra = sorted(set((request.model_extra or {}) if isinstance(request, BaseModel) else {}) - IGNORED_FIELDS)
        if extra:
            raise InvalidRequest("; ".join(f"{k}: unknown field; remove it" for k in extra[:5]), param=extra[0])
        if getattr(request, "tools", None) and getattr(request, "tool_choice", None) != "none" \
                and self.engine.cfg.tool_parser is None:
            raise InvalidRequest(
                f"tools: model '{self.engine.cfg.name}' is served without a tool parser, so it cannot call tools. "
                "Fix: set tool_parser on the model in the serve config (vLLM's parser for its family: hermes, "
                "llama3_json, mistral, qwen3_coder, ...), or send tool_choice: none",
                param="tools", code="tools_unsupported",
            )
        return request

    async def respond(self, req: NativeRequest, adapter: str | None, interval: float) -> AsyncIterator[str | dict]:
        """The serving protocol of :class:`~homefire.serve.serving.OpenAIServing`: ``ACCEPTED`` once the request is
        valid, then SSE text or one JSON body, then the stats dict."""
        received = time.perf_counter()
        request = self.validate(req)
        if adapter is not None:
            # vLLM's serving finds an adapter by the request's model name; homefire loaded it from its registry.
            self.state.openai_serving_models.lora_requests[request.model] = self.engine.lora_request(adapter)
        forced_usage = False
        if req.route in ("chat", "completion") and request.stream:
            # Token counts for homefire's metrics come from vLLM's usage chunk, asked for and dropped if the
            # client did not ask for it.
            from vllm.entrypoints.generate.base.protocol import StreamOptions

            opts = request.stream_options
            if opts is None or not opts.include_usage:
                forced_usage = True
                request.stream_options = StreamOptions(
                    include_usage=True, continuous_usage_stats=bool(opts and opts.continuous_usage_stats))
        yield ACCEPTED
        stats = new_stats(0)
        body = self._answer(req.route, request, stats, forced_usage)
        async for item in timed(body, received, stats, req.stream, interval):
            yield item

    async def _answer(self, route: str, request: Any, stats: dict, forced_usage: bool) -> AsyncIterator[str]:
        handler = self.handlers[route]
        result = await self._call(handler, route, request)
        if isinstance(result, AsyncIterator):
            sse = _sse_events if route == "responses" else _sse_text
            started = False
            async for chunk in sse(result, stats, forced_usage):
                if not started and chunk.startswith('data: {"error"'):
                    # vLLM refuses some requests only once its stream runs (an empty prompt in a batch): before
                    # anything was sent that is still the request's own status, not a 200 carrying an error.
                    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

                    raise self._error(ErrorResponse.model_validate_json(chunk[6:]))
                started = True
                yield chunk
            return
        if route == "embeddings":  # a Starlette response
            text = result.body.decode()
            _count(stats, json.loads(text).get("usage"))
            yield text
            return
        _count(stats, _dump(getattr(result, "usage", None)))
        yield result.model_dump_json(by_alias=True)

    async def _call(self, handler: Any, route: str, request: Any) -> Any:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        with self._refusals(route):
            if route == "chat":
                result = await handler.create_chat_completion(request, None)
            elif route == "completion":
                result = await handler.create_completion(request, None)
            elif route == "responses":
                result = await handler.create_responses(request, None)
            else:
                result = await handler(request, None)
        if isinstance(result, ErrorResponse):
            raise self._error(result)
        return result

    @contextlib.contextmanager
    def _refusals(self, route: str) -> Iterator[None]:
        """vLLM's refusals of a request, raised rather than answered, as homefire's errors. Its own errors (a
        ``ValueError`` or ``VLLMClientError``) keep their status and field. What its validators, renderer and the
        model's chat template raise on a request of the right types they still cannot use (content parts of unknown
        shape, say) is the request's fault too: a 400 naming the route's input. A dead engine says so."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield
        except HomefireError:  # homefire's own verdict (an InvalidRequest is a ValueError too)
            raise
        except EngineDeadError:
            raise self.engine.dead_error() from None
        except (ValueError, VLLMClientError, NotImplementedError) as err:
            raise self._error(create_error_response(err)) from None
        except (TypeError, LookupError, AttributeError, TemplateError) as err:
            field = {"chat": "messages", "completion": "prompt"}.get(route, "input")
            logger.info("model %s: request not usable: %r", self.engine.cfg.name, err)
            raise InvalidRequest(f"{field}: model '{self.engine.cfg.name}' cannot use this request "
                                 f"({type(err).__name__}: {str(err)[:200]})", param=field) from None

    def _error(self, resp: Any) -> HomefireError:
        """vLLM's error response as the homefire error of the same status (a 5xx from a dead engine says so)."""
        err = resp.error
        if err.code == 404:
            return ModelNotFound(err.message, param="model", code="model_not_found")
        if 400 <= err.code < 500:
            return InvalidRequest(err.message, param=err.param)
        if self.engine.errored():
            return self.engine.dead_error()
        logger.error("vLLM answered %d: %s", err.code, err.message)
        return EngineError(f"model '{self.engine.cfg.name}' failed to answer ({err.type}); the server log has the details")


def _dump(obj: Any) -> dict | None:
    return obj.model_dump() if isinstance(obj, BaseModel) else obj


def _count(stats: dict, usage: dict | None) -> None:
    """Token counts of one answer, in either of OpenAI's usage shapes (chat/completions or Responses)."""
    if not usage:
        return
    stats["prompt_tokens"] = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
    stats["completion_tokens"] = usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0


async def _sse_text(stream: AsyncIterator[str], stats: dict, forced_usage: bool) -> AsyncIterator[str]:
    """vLLM's chat/completion SSE text as is, reading the usage chunk (and dropping it when only homefire asked)."""
    async for chunk in stream:
        if '"usage":{' in chunk and chunk.startswith("data: {"):
            data = json.loads(chunk[6:])
            _count(stats, data.get("usage"))
            if forced_usage and not data.get("choices"):
                continue
        yield chunk


async def _sse_events(stream: AsyncIterator[Any], stats: dict, forced_usage: bool) -> AsyncIterator[str]:
    """Responses API events as SSE, named by type (as vLLM's and OpenAI's servers send them)."""
    async for event in stream:
        kind = getattr(event, "type", "unknown")
        if kind == "response.completed":
            _count(stats, _dump(getattr(event.response, "usage", None)))
        yield f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
