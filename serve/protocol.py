"""OpenAI request models: what the API accepts, with bounds on every field.

Responses are built as plain dicts in :mod:`homefire.serve.serving` (cheaper per token
than model instances); their shape follows the OpenAI API reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from homefire.errors import InvalidRequest

MAX_STOP = 16
MAX_STOP_LEN = 256


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs `content`")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a `json_schema` object with a `schema`")
        return self


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit ``null`` means "the default", as OpenAI's API and vLLM's treat it (clients send it)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                    or cls.model_fields[k].default is None}
        return data

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=100_000)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    # OpenAI's fields that mean nothing self-hosted: accepted (clients send them), ignored.
    store: bool | None = Field(None, description="Accepted and ignored: nothing is stored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, max_length=64, description="Accepted and ignored: one tier.")
    # vLLM's extensions, accepted the way vLLM's own server accepts them (its benchmark client sends them).
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0, le=1_000_000)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        for s in stops:
            if not s or len(s) > MAX_STOP_LEN:
                raise ValueError(f"each stop sequence must be 1..{MAX_STOP_LEN} characters")
        return stops

    @model_validator(mode="after")
    def _stream_options(self) -> "_Sampling":
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    response_format: ResponseFormat | None = None
    logprobs: Literal[False] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(description="Text, token ids, or a list with one text.")
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("`prompt` must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("batched prompts are not supported; send one prompt per request (use `n` for choices)")
                if v[0] == "":
                    raise ValueError("`prompt` must not be empty")
        elif v == "":
            raise ValueError("`prompt` must not be empty")
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions


#: OpenAI fields that mean nothing self-hosted: accepted and ignored on every route.
IGNORED_FIELDS = frozenset({"store", "metadata", "service_tier"})

@dataclass
class NativeRequest:
    """An OpenAI request for an engine that brings its own OpenAI layer (vLLM): the decoded JSON body, validated in
    the model's replica by the engine's own request models. homefire's models above cover the common requests on a
    leaner path; everything else a vLLM model accepts (logprobs, tools, logit_bias, batched prompts, the Responses API,
    embeddings, vLLM's extensions) travels as this."""

    route: Literal["chat", "completion", "responses", "embeddings"]
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def n(self) -> int:
        n = self.body.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) else 1


#: Fields homefire's lean models accept only at their default: a request that sets them is for the engine's own layer.
_NOT_LEAN = {"logprobs", "top_logprobs", "echo", "suffix"}


def beyond_lean(err: ValidationError, data: dict) -> bool:
    """Whether homefire's request model refused ``data`` for asking what the lean path does not do (an OpenAI or vLLM
    field it does not implement, logprobs, echo, batched prompts, a message role it does not know) rather than for a bad
    value of what it does: such a request goes to the engine's own OpenAI layer where there is one
    (:class:`NativeRequest`); the rest stay 400s."""
    prompt = data.get("prompt")
    batched = isinstance(prompt, list) and bool(prompt) and (isinstance(prompt[0], list) or
                                                              (isinstance(prompt[0], str) and len(prompt) > 1))
    for e in err.errors():
        loc = e["loc"]
        if e["type"] == "extra_forbidden" or (loc and loc[0] in _NOT_LEAN) or (loc and loc[0] == "prompt" and batched):
            return True
        if len(loc) >= 3 and loc[0] == "messages" and loc[2] == "role" and e.get("input") == "function":
            return True  # OpenAI's legacy role, for vLLM's layer; an unknown role stays a 400
    return False


def validate_request(data: dict, model_cls: type) -> Any:
    """A decoded JSON object -> validated request; InvalidRequest naming the field otherwise."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def validation_error(err: ValidationError) -> InvalidRequest:
    """Pydantic's verdict on a request as one 400 naming the first bad field (and up to five in the message)."""
    errors = err.errors()
    msgs = []
    for e in errors[:5]:
        p = _param(tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            msgs.append(f"{p}: unknown field; remove it")
        elif e["type"] == "missing":
            msgs.append(f"{p}: field required")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r:.60})"
            msgs.append(f"{p}: {e['msg']}{got_s}")
    return InvalidRequest("; ".join(msgs), param=_param(tuple(errors[0]["loc"])))


def _param(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after", "function-before")) or "body"
