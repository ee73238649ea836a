"""``/openapi.json``: request bodies from the request models, the responses serving.py sends, errors, auth."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import schemathesis
from openapi_spec_validator import validate

from homefire.errors import AuthenticationError, InvalidRequest, ModelNotFound, PayloadTooLarge, ServiceUnavailable
from homefire.serve import ingress
from homefire.serve.config import MockModelConfig
from homefire.serve.engines.mock import MockEngine
from homefire.serve.openapi import document
from homefire.serve.protocol import ChatCompletionRequest, CompletionRequest
from homefire.serve.serving import OpenAIServing

GENERATE = ["/v1/chat/completions", "/v1/completions", "/invocations", "/score", ingress.VERTEX_PREDICT_ROUTE]


@pytest.fixture(scope="module")
def schema() -> dict:
    document(ingress.app)
    return ingress.app.openapi()


def _validator(schema: dict, ref: dict) -> jsonschema.Draft202012Validator:
    """A validator for one ``$ref`` of the document (its ``#/components/...`` pointers resolve in it)."""
    return jsonschema.Draft202012Validator({**ref, "components": schema["components"]})


def _body(schema: dict, path: str) -> dict:
    body = schema["paths"][path]["post"]["requestBody"]
    assert body["required"] is True and list(body["content"]) == ["application/json"]
    return body["content"]["application/json"]["schema"]


def test_schema_is_valid_openapi_3_1(schema):
    assert schema["openapi"].startswith("3.1")
    validate(schema)  # raises on an invalid document
    loaded = schemathesis.openapi.from_dict(schema)  # what the fuzz test loads
    loaded.validate()
    assert len(list(loaded.get_all_operations())) == sum(len(item) for item in schema["paths"].values())
    assert ingress.app.openapi() is schema  # built once


def test_responses_and_embeddings_are_documented(schema):
    components = schema["components"]["schemas"]
    assert _body(schema, "/v1/responses") == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert _body(schema, "/v1/embeddings") == {"$ref": "#/components/schemas/EmbeddingRequest"}
    assert set(components["ResponsesRequest"]["required"]) == {"model", "input"}
    assert set(components["EmbeddingRequest"]["required"]) == {"model", "input"}
    ok = schema["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}
    assert schema["paths"]["/v1/embeddings"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingList"}


def test_chat_and_completions_bodies_are_the_request_models(schema):
    components = schema["components"]["schemas"]
    assert _body(schema, "/v1/chat/completions") == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert _body(schema, "/v1/completions") == {"$ref": "#/components/schemas/CompletionRequest"}
    chat, text = components["ChatCompletionRequest"], components["CompletionRequest"]
    assert {"messages", "max_tokens", "max_completion_tokens", "stream", "response_format"} <= set(chat["properties"])
    assert set(chat["required"]) == {"model", "messages"}
    # what vLLM's own OpenAI layer answers for a vLLM model; its further extensions too, so not additionalProperties
    assert {"logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "parallel_tool_calls"} <= set(chat["properties"])
    assert chat.get("additionalProperties") is not False
    assert {"prompt", "max_tokens", "n", "seed", "logprobs", "echo"} <= set(text["properties"])
    assert set(text["required"]) == {"model", "prompt"}
    # $defs are hoisted: the nested models live in components and are referenced from there.
    assert chat["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    roles = components["ChatMessage"]["properties"]["role"]["enum"]
    assert roles == ["system", "developer", "user", "assistant", "tool"]
    assert "$defs" not in json.dumps(schema)


def test_other_bodies(schema):
    either = {"oneOf": [{"$ref": "#/components/schemas/ChatCompletionRequest"},
                        {"$ref": "#/components/schemas/CompletionRequest"}]}
    assert _body(schema, "/invocations") == _body(schema, "/score") == either
    assert _body(schema, "/v1/load_lora_adapter") == {"$ref": "#/components/schemas/LoadAdapterRequest"}
    assert _body(schema, ingress.VERTEX_PREDICT_ROUTE) == {"$ref": "#/components/schemas/VertexPredictRequest"}
    lora_name = schema["components"]["schemas"]["LoadAdapterRequest"]["properties"]["lora_name"]
    assert lora_name["pattern"] == "^[^:]+:[^:]+$"
    get_routes = {p for p, item in schema["paths"].items() if "get" in item}
    assert not any("requestBody" in schema["paths"][p]["get"] for p in get_routes)


def test_examples_are_valid_requests(schema):
    for path in GENERATE:
        media = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        for example in media.get("examples", {}).values():
            _validator(schema, media["schema"]).validate(example["value"])
    assert schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["examples"]


@pytest.mark.parametrize("path", GENERATE)
def test_errors_are_the_openai_error_body(schema, path):
    responses = schema["paths"][path]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(responses)
    for err in (InvalidRequest("n: too big", param="n"), AuthenticationError("no key", code="invalid_api_key"),
                ModelNotFound("model 'x' is not served"), PayloadTooLarge("too big", param="body"),
                ServiceUnavailable("retry", code="timeout")):
        media = responses[str(err.status)]["content"]["application/json"]
        assert media["schema"] == {"$ref": "#/components/schemas/Error"}
        _validator(schema, media["schema"]).validate(err.to_openai())
    with pytest.raises(jsonschema.ValidationError):  # the schema is not vacuous
        _validator(schema, {"$ref": "#/components/schemas/Error"}).validate({"error": {"message": "x"}})


def test_security_is_a_bearer_key_except_on_health_routes(schema):
    bearer = schema["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    public = {"/health", "/ready", "/ping", ingress.VERTEX_HEALTH_ROUTE}
    for path, item in schema["paths"].items():
        for op in item.values():
            assert ("security" not in op) == (path in public), path
            assert ("401" in op["responses"]) == (path not in public), path
    assert set(schema["paths"]["/ready"]["get"]["responses"]) == {"200", "503"}


# ---------------------------------------------------------------------------------- responses as sent
def _serving(model_path: str, **settings) -> OpenAIServing:
    engine = MockEngine(MockModelConfig(name="m", source="x", engine="mock", token_delay_s=0.0, **settings), model_path)
    asyncio.run(engine.start(5))
    return OpenAIServing("m", engine)


def _sent(gen) -> str:
    async def collect():
        return "".join([x async for x in gen if isinstance(x, str)])

    return asyncio.run(collect())


def _events(sse: str) -> list[str]:
    return [e.removeprefix("data: ") for e in sse.split("\n\n") if e]


def test_documented_responses_match_what_serving_sends(schema, tiny_model_path):
    serving = _serving(tiny_model_path)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2}
    for path, req, call in [
        ("/v1/chat/completions", ChatCompletionRequest.model_validate(chat), serving.chat),
        ("/v1/completions", CompletionRequest(model="m", prompt="x", max_tokens=3), serving.completion),
    ]:
        ok = schema["paths"][path]["post"]["responses"]["200"]["content"]
        _validator(schema, ok["application/json"]["schema"]).validate(json.loads(_sent(call(req))))
        streamed = req.model_copy(update={"stream": True, "stream_options": {"include_usage": True}})
        events = _events(_sent(call(streamed)))
        assert events[-1] == "[DONE]"
        event = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"][1]["contentSchema"]
        for data in events[:-1]:
            _validator(schema, event).validate(json.loads(data))
        with pytest.raises(jsonschema.ValidationError):  # a chunk is not a full response, and the other way round
            _validator(schema, ok["application/json"]["schema"]).validate(json.loads(events[0]))


def test_a_stream_that_fails_midway_sends_a_documented_error_event(schema, tiny_model_path):
    serving = _serving(tiny_model_path, fail_after_tokens=1)
    events = _events(_sent(serving.completion(CompletionRequest(model="m", prompt="x", max_tokens=5, stream=True))))
    event = schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    error = json.loads(events[-2])
    assert events[-1] == "[DONE]" and "error" in error
    _validator(schema, event["properties"]["data"]["anyOf"][1]["contentSchema"]).validate(error)
