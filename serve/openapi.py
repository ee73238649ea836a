"""``/openapi.json`` with the request and response bodies the ingress really reads and writes.

The ingress routes read their body from the raw ``Request`` (so that a bad body is answered with an
OpenAI-style 4xx, not FastAPI's 422), which leaves FastAPI's generated schema without any request body.
:func:`document` puts them back, from the same pydantic models the routes validate with, together with
the response shapes :mod:`homefire.serve.serving` builds, the error body of :mod:`homefire.errors` and
the bearer-key scheme. Clients, generators and the fuzz test (``tests/integration/test_reliability.py``) read
the API from the running server.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from homefire.serve import protocol


# ---------------------------------------------------------------------------------- request bodies
# homefire's lean request models, with what a model served by vLLM also takes (its own OpenAI layer answers those
# requests: homefire.serve.engines.vllm_openai). vLLM's further extensions are accepted too; any other field is a 400.
class FunctionDef(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON schema.")
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


_VLLM = " (models served by vLLM)"


class ChatCompletionRequest(protocol.ChatCompletionRequest):
    model_config = ConfigDict(extra="allow")
    logprobs: bool | None = Field(None, description="Return each output token's logprob" + _VLLM + ".")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many alternatives per token.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias added to its logit" + _VLLM + ".")
    tools: list[Tool] | None = Field(None, description="Functions the model may call" + _VLLM + "; `tool_choice: "
                                     "auto` needs the model's `tool_parser` in the serve config.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="`required` or a named function: the call is constrained to the tool's schema.")
    parallel_tool_calls: bool | None = None


class CompletionRequest(protocol.CompletionRequest):
    model_config = ConfigDict(extra="allow")
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="Text or token ids; a list of several" + _VLLM + ".")
    logprobs: int | None = Field(None, ge=0, le=20, description="Logprobs of the N most likely tokens" + _VLLM + ".")
    echo: bool = Field(False, description="Return the prompt with the completion (with logprobs: the prompt's "
                       "logprobs, what lm-eval's loglikelihood tasks read)" + _VLLM + ".")
    logit_bias: dict[str, float] | None = None


class ResponsesRequest(BaseModel):
    """OpenAI's Responses API (models served by vLLM; vLLM's own fields are accepted too)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict[str, Any]] = Field(description="Text, or a list of messages/items.")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    store: bool | None = Field(None, description="Accepted; responses are not stored by default (vLLM's default).")


class EmbeddingRequest(BaseModel):
    """Embeddings (models served by vLLM with `task: embed`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def documented_fields(route: str) -> set[str]:
    """The request fields ``/openapi.json`` documents for ``route`` ("chat" or "completion")."""
    return set({"chat": ChatCompletionRequest, "completion": CompletionRequest}[route].model_fields)


# ---------------------------------------------------------------------------------- response bodies
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens the engine found in its prefix cache (not recomputed).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, description="Where the engine reports it (vLLM): how much of the prompt came from its prefix cache.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: dict[str, Any] = Field(description="`name` and `arguments` (a JSON string).")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = Field(description="With `logprobs: true`: `{content: [{token, logprob, bytes, "
                                            "top_logprobs}]}`.")
    finish_reason: str = Field(description='"stop", "length" or "tool_calls".')


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="Only in each choice's first chunk.")
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="Tool-call deltas: id and name first, then "
                                                    "pieces of the arguments.")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: Usage | None = Field(None, description="Only in the last chunk, with stream_options.include_usage.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = Field(description="With `logprobs: N`: `{tokens, token_logprobs, top_logprobs, "
                                            "text_offset}`.")
    finish_reason: str = Field(description='"stop" or "length".')


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(CompletionChoice):
    finish_reason: str | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: Usage | None = Field(None, description="Only in the last chunk, with stream_options.include_usage.")


class Response(BaseModel):
    id: str
    object: Literal["response"]
    created_at: float
    model: str
    status: str = Field(description='"completed", "incomplete", ...')
    output: list[dict[str, Any]] = Field(description="Output items: messages (`output_text` parts), function calls.")
    usage: dict[str, Any] | None = Field(None, description="`input_tokens`, `output_tokens`, `total_tokens`.")


class ResponseEvent(BaseModel):
    type: str = Field(description="`response.created`, `response.output_text.delta`, ..., `response.completed`; "
                      "also the SSE `event:` name.")
    sequence_number: int | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The vector (base64 with `encoding_format: base64`).")


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: dict[str, int]


class Model(BaseModel):
    id: str = Field(description="A served model, or `<model>:<adapter>` for a registry adapter.")
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="The base model of an adapter.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class LoadedAdapter(BaseModel):
    object: Literal["lora_adapter"]
    status: Literal["loaded"]
    model: str = Field(description="The name to send as `model`: `<model>:<adapter>`.")
    entry: str = Field(description="The registry entry that was loaded.")


class VertexPredictions(BaseModel):
    predictions: list[ChatCompletion | Completion] = Field(description="One response per instance, in order.")


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None


class Error(BaseModel):
    """Every error: the OpenAI error body."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready", "not_ready", "draining"]
    not_ready: dict[str, str] = Field(description="Model -> deployment status, for each model without a replica.")


class Ping(BaseModel):
    status: Literal["ok", "not_ready"]
    not_ready: dict[str, str] = Field(description="Model -> deployment status, for each model without a replica.")


# ---------------------------------------------------------------------------------- routes
_ERRORS = {
    400: "Invalid request; `error.param` names the field.",
    401: "Missing or invalid API key.",
    404: "The model (or adapter) is not served.",
    413: "The body is larger than `server.max_body_bytes`.",
    429: "Over quota; retry after the `Retry-After` header's seconds.",
    500: "The engine failed (not the request's fault).",
    503: "Overloaded (the model's queue is full), shutting down, or no replica answered in time (cold start, engine "
         "restart): retry after the `Retry-After` header's seconds.",
}
_GENERATE_ERRORS = (400, 404, 413, 429, 500, 503)
_EXAMPLES = {  # "Try it out" bodies for the default config's model
    ChatCompletionRequest: {
        "model": "demo", "messages": [{"role": "user", "content": "What is a lambda?"}], "max_tokens": 32,
    },
    CompletionRequest: {"model": "demo", "prompt": "def fibonacci(n):", "max_tokens": 32},
    ResponsesRequest: {"model": "demo", "input": "What is a lambda?", "max_output_tokens": 32},
}


@dataclass(frozen=True)
class _Op:
    """What one route reads and answers; several models mean oneOf."""

    body: tuple[type[BaseModel], ...] = ()
    ok: tuple[type[BaseModel], ...] = ()
    stream: tuple[type[BaseModel], ...] = ()  # each `data:` event of a text/event-stream 200
    errors: tuple[int, ...] = ()
    not_ready: bool = False  # 503 with the 200 body


def _operations() -> dict[tuple[str, str], _Op]:
    # Imported here, not at the top: homefire.serve.ingress imports this module.
    from homefire.serve.ingress import (
        VERTEX_HEALTH_ROUTE, VERTEX_PREDICT_ROUTE, LoadAdapterRequest, VertexPredictRequest,
    )

    chat = (ChatCompletionRequest,), (ChatCompletion,), (ChatCompletionChunk,)
    text = (CompletionRequest,), (Completion,), (CompletionChunk,)
    either = tuple(c + t for c, t in zip(chat, text))  # SageMaker / Azure ML: chat if the body has `messages`
    return {
        ("post", "/v1/chat/completions"): _Op(*chat, _GENERATE_ERRORS),
        ("post", "/v1/completions"): _Op(*text, _GENERATE_ERRORS),
        ("post", "/v1/responses"): _Op((ResponsesRequest,), (Response,), (ResponseEvent,), _GENERATE_ERRORS),
        ("post", "/v1/embeddings"): _Op((EmbeddingRequest,), (EmbeddingList,), (), _GENERATE_ERRORS),
        ("post", "/invocations"): _Op(*either, _GENERATE_ERRORS),
        ("post", "/score"): _Op(*either, _GENERATE_ERRORS),
        ("post", VERTEX_PREDICT_ROUTE): _Op((VertexPredictRequest,), (VertexPredictions,), (), _GENERATE_ERRORS),
        ("post", "/v1/load_lora_adapter"): _Op((LoadAdapterRequest,), (LoadedAdapter,), (), (400, 404, 413, 500, 503)),
        ("get", "/v1/models"): _Op(ok=(ModelList,)),
        ("get", "/health"): _Op(ok=(Health,)),
        ("get", "/ready"): _Op(ok=(Ready,), not_ready=True),
        ("get", "/ping"): _Op(ok=(Ping,), not_ready=True),
        ("get", VERTEX_HEALTH_ROUTE): _Op(ok=(Ping,), not_ready=True),
    }


def document(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``GET /openapi.json``) document the ingress's bodies and auth.

    The schema is built on the first call, from the routes the app has then, so this may run before the
    routes are defined; it must run before ``@serve.ingress(app)``, which freezes a copy of the app.

    Example:
        >>> document(app)
        >>> app.openapi()["paths"]["/v1/chat/completions"]["post"]["requestBody"]["required"]
        True
    """
    app.openapi_schema = None
    app.openapi = functools.partial(_cached_schema, app)


def _cached_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = build_schema(app)
    return app.openapi_schema


def build_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of ``app`` with the bodies, responses and security of :func:`_operations`."""
    from homefire.serve.ingress import _PUBLIC

    schema = get_openapi(
        title=app.title, version=app.version, openapi_version=app.openapi_version, description=app.description,
        routes=app.routes,
    )
    ops = _operations()
    models = {m for op in ops.values() for m in (*op.body, *op.ok, *op.stream)} | {Error}
    models = sorted(models, key=lambda m: m.__name__)  # a stable document
    # One pass over all models: their nested models ($defs) land once in components/schemas, names deduplicated.
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    ref = {m: refs[(m, "validation")] for m in models}

    def one(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
        return ref[models[0]] if len(models) == 1 else {"oneOf": [ref[m] for m in models]}

    error = {"application/json": {"schema": ref[Error]}}
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs["$defs"])
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "One of `server.api_keys` or the keys in `server.api_key_env` (not needed when none is set).",
    }}
    for (method, path), op in ops.items():
        doc = schema["paths"][path][method]
        if op.body:
            examples = {m.__name__: {"value": _EXAMPLES[m]} for m in op.body if m in _EXAMPLES}
            doc["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": one(op.body), **({"examples": examples} if examples else {}),
            }}}
        ok = doc["responses"]["200"]
        ok["content"] = {"application/json": {"schema": one(op.ok)}}
        if op.stream:
            ok["description"] = "The response; with `stream: true`, server-sent events ending with `data: [DONE]`."
            ok["content"]["text/event-stream"] = {"schema": _event(one(op.stream), ref[Error])}
        if op.not_ready:
            doc["responses"]["503"] = {"description": "A model that keeps replicas has none running.",
                                       "content": {"application/json": {"schema": one(op.ok)}}}
        for status in op.errors:
            doc["responses"][str(status)] = {"description": _ERRORS[status], "content": error}
    schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    for path, item in schema["paths"].items():
        if path not in _PUBLIC:
            for doc in item.values():
                doc["security"] = [{"bearer": []}]
                doc["responses"]["401"] = {"description": _ERRORS[401], "content": error}
    return schema


def _event(chunk: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event: a JSON chunk, an error (a stream that fails mid-way), or the closing ``[DONE]``."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, error]}},
        ]}},
    }
