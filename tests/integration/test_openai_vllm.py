"""The OpenAI API end to end: a real local Ray, two models on the real vLLM CPU engine,
requests through the official `openai` client (and raw HTTP for malformed input)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration

KEY = "sk-homefire-test"
CONTEXT = 256  # the `tiny` model's context window, small so length errors are cheap to provoke


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    c = ServeCluster(num_cpus=6)
    c.deploy({
        "models": [
            {"name": "tiny", "source": tiny_model_path, "max_model_len": CONTEXT},
            {"name": "tiny-b", "source": "demo-tiny", "max_model_len": 512},
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
    assert sorted(m.id for m in client.models.list().data) == ["tiny", "tiny-b"]


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
    assert "'gpt-4' is not served" in str(e.value) and "tiny, tiny-b" in str(e.value)
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
    assert set(models) == {"tiny", "tiny-b"}
    assert all(d["running"] == 1 and d["pending"] == 0 for d in models.values())
