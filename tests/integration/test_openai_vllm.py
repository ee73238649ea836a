"""The OpenAI API end to end: a real local Ray, three models on the real vLLM CPU engine (two that generate, one
that embeds), requests through the official `openai` client (and raw HTTP for malformed input)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration

KEY = "sk-homefire-test"
CONTEXT = 256  # the `tiny` model's context window, small so length errors are cheap to provoke


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    # As `homefire serve` runs it: no Serve proxy, the ingress replica is the HTTP server (serve/http.py).
    c = ServeCluster(num_cpus=6, proxy_location="Disabled")
    c.deploy({
        "models": [
            {"name": "tiny", "source": tiny_model_path, "max_model_len": CONTEXT},
            {"name": "tiny-b", "source": "demo-tiny", "max_model_len": 512, "tool_parser": "hermes"},
            {"name": "tiny-embed", "source": tiny_model_path, "max_model_len": CONTEXT, "task": "embed",
             "cpus": 0.5},
        ],
        "server": {"api_keys": [KEY], "max_body_bytes": 65_536, "max_n": 8},
    })
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        yield h


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a Python keyword."}]


def test_models_lists_every_served_model(client):
    assert sorted(m.id for m in client.models.list().data) == ["tiny", "tiny-b", "tiny-embed"]


def test_chat_uses_the_tokenizers_chat_template_and_fills_usage(client, tokenizer):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    expected_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert r.model == "tiny" and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(expected_prompt, add_special_tokens=False))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # The text is what the model generated: re-tokenizing it gives (about) the 8 tokens.
    assert 4 <= len(tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)) <= 12


def test_chat_stream_with_usage_matches_non_stream(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_usage_counts_the_prompt_tokens_vllm_found_in_its_prefix_cache(client, tokenizer):
    words = "harbor quartz ember willow onyx juniper".split()
    text = "Cache me:"
    while len(tokenizer.encode(text)) < 200:  # more than one of vLLM's 128-token CPU blocks, within the 256 context
        text += " " + words[len(text) % len(words)]
    n = len(tokenizer.encode(text))
    first = client.completions.create(model="tiny", prompt=text, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == n and first.usage.prompt_tokens_details.cached_tokens == 0
    again = list(client.completions.create(model="tiny", prompt=text, max_tokens=2, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    # Whole blocks only, and never the last prompt token (vLLM computes it for the first output's logits).
    assert again[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 128 * 128 >= 128, again[-1].usage
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens >= 0  # the chat template moves the prefix: reported, 0 or more


def test_stream_without_include_usage_sends_no_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_completions_stream_and_not(client):
    full = client.completions.create(model="tiny", prompt="The for statement", max_tokens=10, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens == 10
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="The for statement", max_tokens=10, temperature=0, stream=True
        ) if c.choices
    )
    assert streamed == full.choices[0].text


def test_same_seed_same_text_other_seeds_differ(client):
    def sample(seed):
        return client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=seed
        ).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_tiny_top_p_is_greedy(client):
    greedy = client.completions.create(model="tiny", prompt="import", max_tokens=12, temperature=0).choices[0].text
    nucleus = client.completions.create(
        model="tiny", prompt="import", max_tokens=12, temperature=1.0, top_p=1e-6, seed=7
    ).choices[0].text
    assert nucleus == greedy


def test_n_returns_n_choices(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, n=3, seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, n=2, seed=5, stream=True)
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1}


def test_stop_string_ends_the_text_before_it(client):
    base = client.completions.create(model="tiny", prompt="def", max_tokens=40, temperature=0).choices[0].text
    stop = base[10:13]
    assert len(stop) == 3
    r = client.completions.create(model="tiny", prompt="def", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]


def test_response_format_json_schema_is_enforced(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "count": {"type": "integer"}},
        "required": ["answer", "count"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=60, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"answer", "count"} and data["answer"] in ("yes", "no") and isinstance(data["count"], int)


def test_two_models_are_routed_by_name(client):
    a = client.completions.create(model="tiny", prompt="x", max_tokens=2)
    b = client.completions.create(model="tiny-b", prompt="x", max_tokens=2)
    assert (a.model, b.model) == ("tiny", "tiny-b")


def test_unknown_model_is_a_404_listing_served_models(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert "'gpt-4' is not served" in str(e.value) and "tiny, tiny-b, tiny-embed" in str(e.value)
    assert e.value.body["param"] == "model"


def _ok(http) -> None:
    """The server still serves after a bad request."""
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 1})
    assert r.status_code == 200, r.text


def _chat(**over):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(over)
    return json.dumps(body)


BAD_REQUESTS = {
    "malformed_json": ("/v1/chat/completions", '{"model": "tiny", "messages": [', 400, "body"),
    "body_not_an_object": ("/v1/chat/completions", "[1, 2]", 400, "body"),
    "wrong_type_max_tokens": ("/v1/chat/completions", _chat(max_tokens="ten"), 400, "max_tokens"),
    "wrong_type_messages": ("/v1/chat/completions", _chat(messages="hi"), 400, "messages"),
    "missing_messages": ("/v1/chat/completions", json.dumps({"model": "tiny"}), 400, "messages"),
    "empty_messages": ("/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    "unknown_role": ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    "missing_model": ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, "model"),
    "max_tokens_beyond_context": ("/v1/chat/completions", _chat(max_tokens=CONTEXT * 4), 400, "max_tokens"),
    "max_tokens_zero": ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    "negative_temperature": ("/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
    "absurd_temperature": ("/v1/chat/completions", _chat(temperature=1e9), 400, "temperature"),
    "top_p_zero": ("/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
    "absurd_presence_penalty": ("/v1/chat/completions", _chat(presence_penalty=50), 400, "presence_penalty"),
    "huge_n": ("/v1/chat/completions", _chat(n=100), 400, "n"),
    "absurd_n": ("/v1/chat/completions", _chat(n=10**9), 400, "n"),
    "unknown_field": ("/v1/chat/completions", _chat(temprature=0.5), 400, "temprature"),
    "stream_options_without_stream": ("/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400, "body"),
    "bad_response_format": ("/v1/chat/completions", _chat(response_format={"type": "json_schema"}), 400, "response_format"),
    "oversized_body": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x" * 100_000}]), 413, "body"),
    "prompt_longer_than_context": (
        "/v1/completions", json.dumps({"model": "tiny", "prompt": "word " * (CONTEXT * 2), "max_tokens": 1}), 400, "prompt"
    ),
    "messages_longer_than_context": (
        "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "for " * (CONTEXT * 2)}], max_tokens=None),
        400, "messages",
    ),
    "token_ids_outside_vocab": ("/v1/completions", json.dumps({"model": "tiny", "prompt": [1, 10**7]}), 400, "prompt"),
    "empty_prompt": ("/v1/completions", json.dumps({"model": "tiny", "prompt": ""}), 400, "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(http, case):
    path, body, status, param = BAD_REQUESTS[case]
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param == "body":
        assert err["param"] == "body"
    else:
        assert err["param"] is not None and err["param"].startswith(param.split(".")[0]), err
        assert param.split(".")[0] in err["message"]
    _ok(http)


def test_api_key_required_except_on_health(cluster):
    with httpx.Client(base_url=cluster.base_url, timeout=30) as anon:
        r = anon.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anon.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/health").json() == {"status": "ok"}
        ready = anon.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_client_disconnect_mid_stream_leaves_the_server_serving(cluster, http):
    with httpx.Client(base_url=cluster.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    _ok(http)


def test_metrics_count_requests_tokens_and_latency_per_model(client, http):
    client.completions.create(model="tiny-b", prompt="metrics", max_tokens=7)
    list(client.completions.create(model="tiny-b", prompt="metrics", max_tokens=7, stream=True))
    text = http.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['homefire_requests_total{model="tiny-b",route="completions",status="200"}'] >= 2
    assert samples['homefire_completion_tokens_total{model="tiny-b"}'] >= 14
    assert samples['homefire_prompt_tokens_total{model="tiny-b"}'] >= 2
    assert samples['homefire_time_to_first_token_seconds_count{model="tiny-b"}'] >= 2
    assert samples['homefire_inter_token_latency_seconds_count{model="tiny-b"}'] >= 1
    assert 'homefire_ongoing_requests{model="tiny-b"}' in samples
    assert any(k.startswith("homefire_requests_total") and 'status="400"' in k for k in samples)


def test_status_reports_running_replicas(http):
    st = http.get("/v1/status").json()
    models = {d["model"]: d for d in st["deployments"].values() if d["model"]}
    assert set(models) == {"tiny", "tiny-b", "tiny-embed"}
    assert all(d["running"] == 1 and d["pending"] == 0 for d in models.values())


# ---------------------------------------------------------------------------------------------------------------------
# What agents, eval harnesses and RAG stacks send: answered by vLLM's own OpenAI layer in the model's replica.

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Today's weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def _valid_weather_args(arguments: str) -> bool:
    args = json.loads(arguments)
    return set(args) == {"city", "unit"} and args["city"] in ("Paris", "Oslo") and args["unit"] in ("celsius", "fahrenheit")


@pytest.fixture(scope="module")
def no_whitespace(tokenizer) -> dict[str, int]:
    """logit_bias against whitespace-only tokens: the untrained tiny model, inside a JSON grammar that allows
    whitespace anywhere, would otherwise spend its tokens on it."""
    return {str(i): -100 for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == ""}


def test_chat_logprobs_and_top_logprobs_streamed_and_not(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy: the chosen token is the most likely
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])
    assert r.usage.completion_tokens == 4


def test_completion_echo_with_prompt_logprobs_as_lm_eval_sends_it(client, tokenizer):
    """lm-eval's loglikelihood requests: the prompt echoed with each token's logprob, batched prompts."""
    prompts = ["def main():", "import os"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=1, logprobs=1, echo=True, temperature=0)
    assert len(r.choices) == 2
    for choice in r.choices:
        prompt = prompts[choice.index]
        n = len(tokenizer.encode(prompt, add_special_tokens=False))
        lp = choice.logprobs
        assert choice.text.startswith(prompt) and len(lp.tokens) == n + 1
        assert "".join(lp.tokens[:n]) == prompt
        assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_logit_bias_is_applied(client, tokenizer):
    target = tokenizer.encode(" return", add_special_tokens=False)[0]
    r = client.completions.create(model="tiny", prompt="x = 1", max_tokens=3, temperature=1.0,
                                  logit_bias={str(target): 100}, seed=1)
    assert r.choices[0].text == tokenizer.decode([target] * 3)


def test_a_named_tool_choice_returns_a_call_whose_arguments_follow_the_schema(client, no_whitespace):
    r = client.chat.completions.create(
        model="tiny-b", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], max_tokens=140,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, logit_bias=no_whitespace, seed=0,
    )
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather", r.choices[0].message
    assert _valid_weather_args(calls[0].function.arguments), calls[0].function.arguments
    assert calls[0].id


def test_a_required_tool_call_streams_as_tool_call_deltas(client, no_whitespace):
    chunks = list(client.chat.completions.create(
        model="tiny-b", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER], max_tokens=140,
        tool_choice="required", parallel_tool_calls=False, logit_bias=no_whitespace, seed=0, stream=True,
    ))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id and deltas[0].function.name == "get_weather"
    assert _valid_weather_args("".join(d.function.arguments or "" for d in deltas))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_turn_is_rendered_through_the_models_chat_template(client, tokenizer):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"}]
    r = client.chat.completions.create(model="tiny-b", messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=2)
    rendered = tokenizer.apply_chat_template(
        messages[:1] + [{**messages[1], "tool_calls": [{**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}]}, messages[2]],
        tools=[WEATHER], add_generation_prompt=True, tokenize=False,
    )
    assert "<tool_response>sunny, 21</tool_response>" in rendered
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_tools_on_a_model_without_a_tool_parser_are_a_400_naming_the_fix(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "tool_parser" in r.json()["error"]["message"]
    _ok(http)


def test_responses_api_plain_and_streamed(client):
    r = client.responses.create(model="tiny", input="Name a Python keyword.", instructions="Be terse.",
                                max_output_tokens=8, temperature=0)
    assert r.status == "incomplete" and r.output_text and r.usage.output_tokens == 8
    events = list(client.responses.create(model="tiny", input="Name a Python keyword.", instructions="Be terse.",
                                          max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    messages = client.responses.create(model="tiny", max_output_tokens=4, input=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}])
    assert messages.output_text


def test_responses_api_with_a_required_tool_returns_a_function_call(client, no_whitespace):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    r = client.responses.create(model="tiny-b", input="Weather in Paris?", tools=[tool], tool_choice="required",
                                max_output_tokens=140, extra_body={"logit_bias": no_whitespace, "seed": 0})
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather", r.output
    assert _valid_weather_args(calls[0].arguments)


def test_embeddings_are_unit_vectors_and_the_same_text_embeds_the_same(client, tiny_model_path):
    hidden = json.loads((Path(tiny_model_path) / "config.json").read_text())["hidden_size"]
    r = client.embeddings.create(model="tiny-embed", input=["def main():", "import os", "def main():"])
    vectors = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
    assert len(vectors) == 3 and len(vectors[0]) == hidden  # last-token pooling of the model's hidden state
    for v in vectors:
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-3)
    assert vectors[0] == pytest.approx(vectors[2]) and vectors[0] != pytest.approx(vectors[1])
    assert r.usage.prompt_tokens > 0 and r.model == "tiny-embed"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/embeddings", {"model": "tiny", "input": "x"}, "model"),
    ("/v1/chat/completions", {"model": "tiny-embed", "messages": MESSAGES}, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "logprobs": True, "top_logprob": 2}, "top_logprob"),
    ("/v1/responses", {"model": "tiny", "input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
    ("/v1/responses", {"model": "tiny"}, "input"),
    # refused by vLLM only once its stream runs (found by the schema fuzz): still a 400, not a 200 carrying the error
    ("/v1/completions", {"model": "tiny", "prompt": ["a", ""], "max_tokens": 2, "stream": True}, "prompt"),
])
def test_what_vllms_layer_refuses_is_a_400_naming_the_field(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in err["message"], err
    _ok(http)


def test_metrics_count_what_vllms_layer_answers(client, http):
    client.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=5, logprobs=True)
    list(client.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=5, logprobs=True, stream=True))
    before = _samples(http)
    client.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=5, logprobs=True)
    chunks = list(client.chat.completions.create(model="tiny-b", messages=MESSAGES, max_tokens=5, logprobs=True,
                                                 stream=True))
    assert all(c.usage is None for c in chunks)  # homefire asked vLLM for usage; the client did not get it
    after = _samples(http)
    assert after['homefire_completion_tokens_total{model="tiny-b"}'] - before['homefire_completion_tokens_total{model="tiny-b"}'] == 10
    assert after['homefire_time_to_first_token_seconds_count{model="tiny-b"}'] - before['homefire_time_to_first_token_seconds_count{model="tiny-b"}'] == 2


def _samples(http) -> dict[str, float]:
    samples = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# ---------------------------------------------------------------------------------------------------------------------
# EleutherAI's lm-evaluation-harness against the live API, as a user runs it: `python -m lm_eval --model
# local-completions` on the task shipped in tune/data/lm_eval/ (loglikelihood: /v1/completions with echo, logprobs and
# token-id prompts).

ROOT = Path(__file__).resolve().parents[2]
LM_EVAL_TASK = "homefire_pydoc_cloze"
LM_EVAL_MODEL = "tiny-b"  # the same tiny model with a 512-token context
LM_EVAL_CONTEXT = 512  # its max_model_len, passed to lm-eval as max_length so it never sends a longer prompt
LM_EVAL_LIMIT = 20


def test_the_task_loads_offline_from_any_directory(tmp_path, monkeypatch):
    """lm-eval finds the shipped task by --include_path and reads all 128 docs without the repo as cwd or a hub."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = TaskManager(include_path=str(ROOT / "tune" / "data" / "lm_eval")).load([LM_EVAL_TASK])["tasks"][LM_EVAL_TASK]
    docs = list(task.test_docs())
    assert len(docs) == 128 and task.OUTPUT_TYPE == "loglikelihood"
    assert task.doc_to_text(docs[0]).endswith("refer\nto the built-in variables with")
    assert task.doc_to_target(docs[0]) == " those"


@pytest.fixture(scope="module")
def lm_eval_run(cluster, tiny_model_path, tmp_path_factory) -> tuple[dict, list[dict]]:
    """Runs lm-eval once from the repo root; returns its results JSON and its logged samples."""
    out = tmp_path_factory.mktemp("lm-eval")
    model_args = ",".join([
        f"model={LM_EVAL_MODEL}",
        f"base_url={cluster.base_url}/v1/completions",
        "tokenizer_backend=huggingface",
        f"tokenizer={tiny_model_path}",
        "num_concurrent=1",
        "max_retries=1",
        f"max_length={LM_EVAL_CONTEXT}",
    ])
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", LM_EVAL_TASK, "--include_path", "tune/data/lm_eval", "--limit", str(LM_EVAL_LIMIT),
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": KEY, "HF_DATASETS_CACHE": str(out / "hf-datasets")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"lm-eval exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{LM_EVAL_TASK}_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1, f"lm-eval wrote {sorted(p.name for p in out.rglob('*'))}"
    return json.loads(results[0].read_text()), [json.loads(line) for line in samples[0].read_text().splitlines()]


def _response(sample: dict) -> tuple[float, bool]:
    """The (log-likelihood, is_greedy) pair lm-eval got for one doc (its samples file logs them as strings)."""
    ll, is_greedy = sample["resps"][0][0]
    return float(ll), {"True": True, "False": False}[is_greedy]


def test_lm_eval_scores_the_shipped_task_through_the_api(lm_eval_run):
    results, samples = lm_eval_run
    scores = results["results"][LM_EVAL_TASK]
    assert results["n-samples"][LM_EVAL_TASK] == {"original": 128, "effective": LM_EVAL_LIMIT}
    # perplexity = exp(-mean log-likelihood of the reference word): finite and at least 1 for any real model.
    assert math.isfinite(scores["perplexity,none"]) and scores["perplexity,none"] >= 1.0
    assert 0.0 <= scores["acc,none"] <= 1.0
    # each doc scores " <reference>" after its prompt: the word with its space, as a reader would continue
    assert [s["arguments"]["gen_args_0"]["arg_1"] for s in samples] == [" " + s["doc"]["reference"] for s in samples]
    lls = [_response(s)[0] for s in samples]
    assert len(lls) == LM_EVAL_LIMIT and all(math.isfinite(ll) and ll < 0 for ll in lls)
    assert scores["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / LM_EVAL_LIMIT), rel=1e-6)
    assert scores["acc,none"] == pytest.approx(sum(_response(s)[1] for s in samples) / LM_EVAL_LIMIT)


def test_lm_eval_loglikelihoods_are_the_models_own(lm_eval_run, tiny_model_path):
    """Each reference word's log-likelihood (and whether it is the greedy continuation) that lm-eval got over HTTP is
    what the checkpoint itself gives it (float32 on both sides), tokenized as lm-eval does: the context's tokens, then
    the tail of context+word's tokens past them, no special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, samples = lm_eval_run
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    for s in samples:
        context, word = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
        stripped = context.rstrip()  # lm-eval moves the context's trailing whitespace onto the word
        context, word = stripped, context[len(stripped):] + word
        ctx = tok(context, add_special_tokens=False).input_ids
        ids = ctx + tok(context + word, add_special_tokens=False).input_ids[len(ctx):]  # what lm-eval sends
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))
        got, is_greedy = _response(s)
        assert got == pytest.approx(expected, abs=1e-3), (s["doc_id"], context, word)
        greedy = all(logprobs[i - 1].argmax().item() == ids[i] for i in range(len(ctx), len(ids)))
        assert is_greedy == greedy, s["doc_id"]


def test_openai_fields_that_mean_nothing_self_hosted_are_accepted_on_both_paths(client):
    for extra in ({}, {"logprobs": True}):  # homefire's lean path, vLLM's layer
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, store=True,
                                           metadata={"team": "a"}, service_tier="auto", user="u1", **extra)
        assert r.usage.completion_tokens == 2
