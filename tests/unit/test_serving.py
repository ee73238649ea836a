"""The OpenAI layer over an engine, without Ray: response shapes, length checks, time batching."""

from __future__ import annotations

import asyncio
import json

import pytest

from homefire.errors import InvalidRequest
from homefire.serve.config import MockModelConfig
from homefire.serve.engines.mock import MockEngine
from homefire.serve.ingress import load_json_object
from homefire.serve.protocol import ChatCompletionRequest, CompletionRequest, validate_request
from homefire.serve.serving import ACCEPTED, OpenAIServing


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    """The model path: the mock engine loads its tokenizer from there."""
    return tiny_model_path


def _serving(model_path, interval=0.0, **settings):
    cfg = MockModelConfig(name="m", source="x", engine="mock", **{"token_delay_s": 0.001, **settings})
    engine = MockEngine(cfg, model_path)
    asyncio.run(engine.start(5))
    return OpenAIServing("m", engine, stream_interval_s=interval)


def _run(gen):
    async def collect():
        return [x async for x in gen]

    return asyncio.run(collect())


def _chat(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_non_stream_chat_body_and_stats(tokenizer):
    items = _run(_serving(tokenizer).chat(_chat(max_tokens=5, n=2, seed=1)))
    assert items[0] == ACCEPTED and isinstance(items[-1], dict)
    body = json.loads(items[1])
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 10 and items[-1]["completion_tokens"] == 10
    assert items[-1]["ttft_s"] is not None


def test_stream_is_valid_sse_ending_in_done(tokenizer):
    items = _run(_serving(tokenizer).chat(_chat(max_tokens=4, stream=True, stream_options={"include_usage": True})))
    sse = "".join(i for i in items if isinstance(i, str))
    events = [e[6:] for e in sse.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_time_batching_joins_chunks_without_losing_any(tokenizer):
    unbatched = _run(_serving(tokenizer, 0.0).completion(CompletionRequest(model="m", prompt="x", max_tokens=30, stream=True, seed=3)))
    batched = _run(_serving(tokenizer, 0.02).completion(CompletionRequest(model="m", prompt="x", max_tokens=30, stream=True, seed=3)))
    def text(items):
        events = "".join(i for i in items if isinstance(i, str)).split("\n\n")
        return "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {"))

    assert text(batched) == text(unbatched) and len(text(batched).split()) == 30
    assert len(batched) < len(unbatched) / 2  # fewer, larger items cross Ray's hops


def test_length_checks_name_the_field(tokenizer):
    s = _serving(tokenizer, max_model_len=64)
    with pytest.raises(InvalidRequest) as e:
        _run(s.completion(CompletionRequest(model="m", prompt="word " * 100, max_tokens=1)))
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest) as e:
        _run(s.chat(_chat(max_completion_tokens=1000)))
    assert e.value.param == "max_completion_tokens" and "at most" in e.value.message


def test_mid_stream_failure_becomes_an_error_event_then_done(tokenizer):
    items = _run(_serving(tokenizer, fail_after_tokens=2).completion(CompletionRequest(model="m", prompt="x", max_tokens=9, stream=True)))
    sse = "".join(i for i in items if isinstance(i, str))
    events = [e[6:] for e in sse.split("\n\n") if e]
    assert events[-1] == "[DONE]" and "mock engine failure" in json.loads(events[-2])["error"]["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", "body"),
        (b'"a string"', "body"),
        (b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": "two"}', "n"),
        (b'{"model": "m", "messages": [{"role": "user"}]}', "messages.0"),
    ],
)
def test_validate_request_names_the_field(body, param):
    with pytest.raises(InvalidRequest) as e:
        validate_request(load_json_object(body), ChatCompletionRequest)
    assert e.value.param == param


@pytest.mark.parametrize("interval", [0.0, 0.02])
def test_a_failure_before_any_output_is_raised_not_streamed_so_the_ingress_can_retry_it(tokenizer, interval):
    """Nothing was sent yet: the error surfaces as an exception (the ingress retries a retryable one, or answers with
    its status), not as a 200 stream carrying an error event."""
    from homefire.errors import EngineError

    for stream in (True, False):
        gen = _serving(tokenizer, interval, fail_after_tokens=0).chat(_chat(max_tokens=5, stream=stream))
        with pytest.raises(EngineError, match="mock engine failure"):
            _run(gen)


def test_a_chat_stream_sends_the_role_together_with_the_first_tokens(tokenizer):
    items = _run(_serving(tokenizer).chat(_chat(max_tokens=3, stream=True)))
    first = items[1]  # after ACCEPTED: the first item that leaves the replica
    events = [json.loads(e[6:]) for e in first.split("\n\n") if e.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[1]["choices"][0]["delta"]["content"]


def test_explicit_null_means_the_default_and_an_empty_prompt_in_a_list_is_refused():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "temperature": None, "n": None, "top_p": None, "stream": None})
    assert (req.temperature, req.n, req.top_p, req.stream) == (1.0, 1, 1.0, False)
    with pytest.raises(InvalidRequest) as e:
        validate_request(load_json_object(b'{"model": "m", "prompt": [""]}'), CompletionRequest)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("data, beyond", [
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}, True),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, True),
    ({"messages": [{"role": "user", "content": "x"}], "temprature": 0.5}, True),  # a typo: vLLM's layer names it
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, False),  # a bad value stays homefire's 400
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["x"] * 100}, False),
    ({"messages": [{"role": "function", "name": "f", "content": "1"}]}, True),  # OpenAI's legacy role: vLLM takes it
    ({"prompt": ["a", "b"]}, True),  # batched
    ({"prompt": [[1, 2], [3]]}, True),
    ({"prompt": ""}, False),
    ({"prompt": "x", "echo": True, "logprobs": 1}, True),
])
def test_beyond_lean_sends_only_what_homefires_models_do_not_implement_to_the_engines_layer(data, beyond):
    from pydantic import ValidationError

    from homefire.serve.protocol import beyond_lean

    model = ChatCompletionRequest if "messages" in data else CompletionRequest
    with pytest.raises(ValidationError) as err:
        model.model_validate({"model": "m", **data})
    assert beyond_lean(err.value, data) is beyond
