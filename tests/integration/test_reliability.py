"""The API under bad input, overload and failure, on the real vLLM CPU engine.

- Fuzz: schemathesis from homefire's own ``/openapi.json``, then from vLLM's request models. For every generated
  request, valid or not (schema examples, then Hypothesis' positive and negative cases): no 5xx, every 4xx is the
  OpenAI error body, and against homefire's schema the answer is what it documents. Derandomized: CI sends the same
  requests every run.
- Overload: bounded admission, the excess refused at once with 503 + Retry-After.
- A killed engine (the API runs in the model's replica, the default for one model): replaced inside the replica, no
  plain request lost (they wait for the new engine), readiness drops and comes back.
- A killed model replica behind a separate ingress (`server.ingress: separate`): no plain request lost (retried),
  errors carry no Ray internals, no engine process left behind.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import time

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import ServeCluster

pytestmark = pytest.mark.integration

KEY = "sk-homefire-fuzz"
MODEL = "tiny"
MAX_TOKENS = 4  # generated requests may ask for up to 1e6 tokens: cap the engine's work per case
MAX_N = 2  # the server's max_n; `n` is capped one above it, so the "above this server's limit" path stays covered
FUZZ = settings(
    deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
# Requests an earlier run found answered with a 5xx (by schemathesis' coverage phase, too slow to run here):
# sent first, as explicit examples, so a regression fails every run.
REGRESSIONS = {
    "/v1/completions": [{"model": MODEL, "prompt": [""]}],  # passed validation, then vLLM refused the empty prompt
}
COUNTS = {"homefire": collections.Counter(), "vllm": collections.Counter()}  # answers by status class
SENT: dict[str, set] = {"homefire": set(), "vllm": set()}
REFUSED: collections.Counter = collections.Counter()  # (path, param) of each 4xx, to see what is refused


TOKENS = 500  # per request in the kill tests (the model's whole context)
ONGOING, QUEUED = 8, 8  # per replica / waiting: small, so overload is cheap to provoke
RAY_INTERNALS = re.compile(r"ActorDiedError|RayActorError|actor_id|ip=|pid=|namespace|EngineCore|Traceback")
AUTH = {"Authorization": f"Bearer {KEY}"}


def _app(model_path: str, **server) -> dict:
    return {
        "models": [{"name": MODEL, "source": model_path, "max_model_len": 512, "health_check_period_s": 1,
                    "max_ongoing_requests": ONGOING, "max_queued_requests": QUEUED}],
        "server": {"api_keys": [KEY], "max_body_bytes": 65_536, "max_n": MAX_N, "cold_start_timeout_s": 180, **server},
    }


@pytest.fixture(scope="module")
def cluster(tiny_model_path):
    c = ServeCluster(num_cpus=6)
    c.deploy(_app(tiny_model_path))
    yield c
    c.close()
    for name, counts in COUNTS.items():
        print(f"\nfuzz {name} schema: {sum(counts.values())} requests, "
              + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print("most refused (path, param):", REFUSED.most_common(12))
    # A fuzz that never reached the engine (every request refused, say for a broken key) proves nothing.
    assert not COUNTS["homefire"] or COUNTS["homefire"]["2xx"], "no generated request was answered 200"


def _openapi(paths: dict, schemas: dict) -> dict:
    return {"openapi": "3.1.0", "info": {"title": "fuzz", "version": "0"}, "paths": paths,
            "components": {"schemas": schemas}}


def _steer(schemas: dict, *names: str) -> None:
    """Send generated requests to the served model, with the fields every client sends (vLLM's schema makes
    `model` and `prompt` optional): else nearly every request stops at a 404 or a 400 before the engine."""
    for name in names:
        schema = schemas[name]
        schema["properties"]["model"] = {"enum": [MODEL]}  # negative cases still send other names
        schema["required"] = sorted({*schema.get("required", ()), "model", *({"prompt"} & set(schema["properties"]))})


@pytest.fixture(scope="module")
def homefire_schema(cluster):
    raw = httpx.get(f"{cluster.base_url}/openapi.json", timeout=30).json()
    assert any("requestBody" in op for item in raw["paths"].values() for op in item.values()), (
        "GET /openapi.json documents no request body: serve/ingress.py must call "
        "homefire.serve.openapi.document(app) before @serve.ingress(app) freezes the app"
    )
    schemas = raw["components"]["schemas"]
    _steer(schemas, "ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "EmbeddingRequest")
    schemas["VertexPredictRequest"]["properties"]["instances"]["items"] = {"oneOf": [
        {"$ref": "#/components/schemas/ChatCompletionRequest"}, {"$ref": "#/components/schemas/CompletionRequest"},
    ]}
    for path, item in raw["paths"].items():
        media = item.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {})
        for example in media.get("examples", {}).values():
            example["value"]["model"] = MODEL
        for i, body in enumerate(REGRESSIONS.get(path, ())):
            media.setdefault("examples", {})[f"regression-{i}"] = {"value": body}
    return _load(raw, cluster)


@pytest.fixture(scope="module")
def vllm_schema(cluster):
    """POST /v1/chat/completions, /v1/completions and /v1/responses with vLLM's own request models as bodies."""
    from pydantic.json_schema import models_json_schema
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    routes = [("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest),
              ("/v1/responses", ResponsesRequest)]
    refs, defs = models_json_schema([(model, "validation") for _, model in routes],
                                    ref_template="#/components/schemas/{model}")
    paths = {
        path: {"post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}}},
            "responses": {"default": {"description": "any"}},
        }}
        for path, model in routes
    }
    # What vLLM itself refuses whatever the server in front: a Responses `prompt` template.
    del defs["$defs"]["ResponsesRequest"]["properties"]["prompt"]
    _steer(defs["$defs"], "ChatCompletionRequest", "CompletionRequest", "ResponsesRequest")
    for _, model in routes:  # vLLM's models take any field (and log it); homefire refuses an unknown one by name
        defs["$defs"][model.__name__]["additionalProperties"] = False
    # Valid requests only (the homefire schema's fuzz sends the invalid ones): is what vLLM accepts answered?
    return _load(_openapi(paths, defs["$defs"]), cluster, mode="positive")


def _load(raw: dict, cluster, mode: str = "all"):
    # Schema examples, then Hypothesis (positive and negative cases). Not the coverage phase: its boundary
    # values and unexpected-method probes are ~300 requests per operation, minutes on a 2-core box.
    config = schemathesis.Config.from_dict({
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        "generation": {"mode": mode},
    })
    schema = schemathesis.openapi.from_dict(raw, config=config)
    schema.config.update(base_url=cluster.base_url)
    return schema


def _bounded(body) -> None:
    """Cap the tokens and choices a request asks for; everything else stays as generated."""
    if not isinstance(body, dict):
        return
    for key, cap in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS), ("max_output_tokens", MAX_TOKENS),
                     ("n", MAX_N + 1)):
        if type(body.get(key)) is int and body[key] > cap:
            body[key] = cap
    if "input" in body:  # the Responses API
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = MAX_TOKENS
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None and (
            "messages" in body or "prompt" in body):
        body["max_tokens"] = MAX_TOKENS  # absent: the rest of the context for a chat, 16 for a completion
    if isinstance(body.get("instances"), list):  # Vertex: each instance is a request
        for instance in body["instances"]:
            _bounded(instance)


def _send(case, counts: collections.Counter, seen: set):
    """Send ``case`` once (Hypothesis repeats bodiless requests) and check the property on the answer."""
    _bounded(case.body)
    key = (case.method, case.formatted_path, json.dumps(case.body, sort_keys=True, default=repr), repr(case.query))
    if key in seen:
        return None
    seen.add(key)
    # The key goes with every request, except the negative cases schemathesis sends without it (then a 401).
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    status = response.status_code
    counts[f"{status // 100}xx"] += 1
    if 400 <= status < 500 and _is_openai_error(response):
        REFUSED[case.formatted_path, response.json()["error"].get("param"), response.json()["error"]["message"][:70]] += 1
    # Not case.as_curl_command(): it masks every field whose name contains "token" (max_tokens, min_tokens).
    body = json.dumps(case.body, default=repr)
    what = f"{case.method} {case.formatted_path} {body}\n-> {status} {response.content[:2000]!r}"
    assert status < 500, f"server error:\n{what}"
    assert status < 400 or _is_openai_error(response), f"a {status} without the OpenAI error body:\n{what}"
    return response


def _is_openai_error(response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


homefire_api = schemathesis.pytest.from_fixture("homefire_schema")
vllm_api = schemathesis.pytest.from_fixture("vllm_schema")


@homefire_api.parametrize()
@settings(FUZZ, max_examples=60)
def test_homefire_schema(case):
    response = _send(case, COUNTS["homefire"], SENT["homefire"])
    if response is not None:
        # and the answer is what /openapi.json documents
        case.validate_response(
            response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
        )


@vllm_api.parametrize()
@settings(FUZZ, max_examples=60)
def test_vllm_request_schema(case):
    _send(case, COUNTS["vllm"], SENT["vllm"])


# ------------------------------------------------------------------ overload and failure
def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _one(h: httpx.AsyncClient, stream: bool, max_tokens: int) -> dict:
    body = {"model": "tiny", "prompt": "x", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    try:
        if stream:
            async with h.stream("POST", "/v1/completions", json=body) as r:
                text = "".join([t async for t in r.aiter_text()])
        else:
            r = await h.post("/v1/completions", json=body)
            text = r.text
    except httpx.HTTPError as err:  # a dropped connection: what must never happen
        return {"status": type(err).__name__, "s": time.perf_counter() - t0, "text": "", "headers": {}}
    usage = re.search(r'"completion_tokens": ?(\d+)', text)
    return {"status": r.status_code, "s": time.perf_counter() - t0, "text": text, "headers": r.headers,
            "tokens": int(usage[1]) if usage else 0, "stream": stream, "done": text.rstrip().endswith("data: [DONE]")}


async def _burst(base_url: str, streams: int, plain: int, max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=streams + plain + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits, headers=AUTH) as h:
        jobs = [_one(h, i < streams, max_tokens) for i in range(streams + plain)]
        return await asyncio.gather(*jobs)


def test_overload_admits_what_it_can_and_refuses_the_rest_at_once_with_retry_after(cluster):
    results = asyncio.run(_burst(cluster.base_url, streams=150, plain=150, max_tokens=32))
    admitted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    assert all(r["status"] == 503 for r in refused), {r["status"] for r in refused}
    for r in refused:
        err = httpx.Response(503, content=r["text"]).json()["error"]
        assert err["code"] == "overloaded" and "tiny" in err["message"] and int(r["headers"]["retry-after"]) >= 1
    # Everything admitted finished in full; the queue bound held (requests freed by early finishers may be admitted).
    assert admitted and all(r["tokens"] == 32 for r in admitted)
    assert all(r["done"] for r in admitted if r["stream"])
    assert ONGOING <= len(admitted) < len(results) // 2, len(admitted)
    print(f"\noverload: 300 at once -> {len(admitted)} admitted (p99 {_percentile([r['s'] for r in admitted], .99):.2f}s)"
          f", {len(refused)} refused with 503 + Retry-After (p99 {_percentile([r['s'] for r in refused], .99):.2f}s)")
    # And then it serves as before.
    again = asyncio.run(_burst(cluster.base_url, streams=0, plain=1, max_tokens=4))
    assert again[0]["status"] == 200


def _replica_pid() -> int:
    """The model's replica (which, in the default layout for one model, also serves the API)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)
    pids = [a.pid for a in actors if (a.class_name or "").startswith("ServeReplica:homefire:model-tiny")]
    assert len(pids) == 1, actors
    return pids[0]


def _engine_core(replica_pid: int) -> psutil.Process:
    procs = [p for p in psutil.Process(replica_pid).children(recursive=True)
             if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(procs) == 1, [(p.pid, p.name()) for p in psutil.Process(replica_pid).children(recursive=True)]
    return procs[0]


def _kill_under_load(cluster, victim) -> tuple[list[dict], dict]:
    """6 plain + 2 streamed requests generating (no more than the queue bound, so none is refused); SIGKILL
    ``victim()``'s pid; readiness and recovery times."""
    times: dict = {}

    async def scenario():
        # Long enough to be generating when the kill comes, even on a fast machine (the tiny model decodes in ms).
        load = asyncio.ensure_future(_burst(cluster.base_url, streams=2, plain=6, max_tokens=TOKENS))
        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=10, headers=AUTH) as h:
            while 'homefire_ongoing_requests{model="tiny"} 8.0' not in (await h.get("/metrics")).text:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # tokens are flowing
            os.kill(victim(), signal.SIGKILL)
            t0 = time.monotonic()
            while (await h.get("/ready")).status_code == 200 and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.1)
            times["unready_s"] = time.monotonic() - t0
            while (await h.get("/ready")).status_code != 200 and time.monotonic() - t0 < 240:
                await asyncio.sleep(0.25)
            times["ready_again_s"] = time.monotonic() - t0
        results = await load
        times["all_answered_s"] = time.monotonic() - t0
        return results

    return asyncio.run(scenario()), times


def _check_no_request_lost(results: list[dict]) -> None:
    plain = [r for r in results if not r["stream"]]
    streams = [r for r in results if r["stream"]]
    # Every plain request was answered in full: the ones the dead engine held were sent again.
    assert [(r["status"], r["tokens"]) for r in plain] == [(200, TOKENS)] * len(plain), [r["text"][:200] for r in plain]
    # Streams that had sent tokens cannot be replayed: they end with an error event and [DONE], never a cut connection.
    for r in streams:
        assert r["status"] == 200 and r["done"], r["text"][-300:]
        if r["tokens"] != TOKENS:
            err = re.search(r'data: (\{"error".*?\})\n', r["text"])
            assert err and not RAY_INTERNALS.search(err[1]), r["text"][-300:]


def test_a_killed_engine_is_replaced_in_its_replica_and_loses_no_plain_request(cluster):
    replica = _replica_pid()
    old_engine = _engine_core(replica)
    results, times = _kill_under_load(cluster, lambda: old_engine.pid)
    _check_no_request_lost(results)
    assert times["unready_s"] < 30 and times["ready_again_s"] < 240, times
    # The same replica (and so the same API listener) serves on with a new engine; the old one left nothing behind.
    assert _replica_pid() == replica and _engine_core(replica).pid != old_engine.pid
    retries = httpx.get(cluster.base_url + "/metrics", headers=AUTH).text
    assert re.search(r'homefire_retries_total\{model="tiny"\} ([1-9]\d*)', retries), retries
    print(f"\nengine killed: readiness dropped after {times['unready_s']:.1f}s, back after {times['ready_again_s']:.1f}s, "
          f"all 8 answered after {times['all_answered_s']:.1f}s")


def test_a_killed_replica_behind_a_separate_ingress_loses_no_plain_request_and_leaves_no_engine_behind(
    cluster, tiny_model_path
):
    cluster.deploy(_app(tiny_model_path, ingress="separate"))
    old_replica = _replica_pid()
    old_engine = _engine_core(old_replica)
    results, times = _kill_under_load(cluster, lambda: old_replica)
    _check_no_request_lost(results)
    assert times["unready_s"] < 30 and times["ready_again_s"] < 240, times
    _, alive = psutil.wait_procs([old_engine], timeout=30)
    assert not alive, f"the killed replica's engine process {old_engine.pid} outlived it"
    print(f"\nreplica killed: readiness dropped after {times['unready_s']:.1f}s, back after {times['ready_again_s']:.1f}s, "
          f"all 8 answered after {times['all_answered_s']:.1f}s")
