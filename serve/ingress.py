"""The OpenAI-compatible front door: auth, parsing, routing by ``model``, the one error edge.

Routes
    ``GET /health`` (liveness, no key) · ``GET /ready`` (readiness, no key) ·
    ``GET /v1/models`` · ``POST /v1/chat/completions`` · ``POST /v1/completions`` ·
    ``GET /v1/status`` · ``GET /metrics`` (Prometheus).

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status for bad input; nothing the client sends produces a 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from homefire import constants
from homefire.errors import (
    AuthenticationError,
    EngineDead,
    EngineError,
    HomefireError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceUnavailable,
)
from homefire.serve.config import ServerConfig
from homefire.serve.http import ApiServer, bind_when_free, own_http_address
from homefire.serve.local import LocalHandle
from homefire.serve.metrics import ServeMetrics
from homefire.serve.openapi import document
from homefire.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NativeRequest,
    beyond_lean,
    validate_request,
    validation_error,
)

logger = logging.getLogger(__name__)

app = FastAPI(title="homefire", description="OpenAI-compatible API for models served by homefire.")
# Before @serve.ingress below, which freezes a copy of the app: the request and response models in /openapi.json.
document(app)
# Managed-endpoint container contracts (SageMaker, Vertex AI, Azure ML). Vertex names its routes in the
# environment of the container; read at import, in the replica that serves them.
VERTEX_HEALTH_ROUTE = os.environ.get("AIP_HEALTH_ROUTE", "/vertex/health")
VERTEX_PREDICT_ROUTE = os.environ.get("AIP_PREDICT_ROUTE", "/vertex/predict")
_PUBLIC = {"/health", "/ready", "/ping", VERTEX_HEALTH_ROUTE}


def error_response(err: HomefireError) -> JSONResponse:
    """The single place a homefire error becomes an HTTP response (429 and 503 say when to come back)."""
    headers = {"Retry-After": str(math.ceil(err.retry_after_s))} if err.retry_after_s else None
    return JSONResponse(err.to_openai(), status_code=err.status, headers=headers)


_DONE_EVENT = "data: [DONE]\n\n"


def error_event(err: HomefireError) -> str:
    """The same error as a server-sent event, for failures after a stream has started."""
    return f"data: {json.dumps(err.to_openai())}\n\n{_DONE_EVENT}"


@app.exception_handler(HomefireError)
async def _homefire_error(request: Request, err: HomefireError) -> JSONResponse:
    return error_response(err)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    body = {"error": {"message": f"{request.method} {request.url.path}: {err.detail}", "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=err.status_code)


def load_json_object(body: bytes) -> dict:
    """JSON bytes -> a dict; InvalidRequest naming the body otherwise."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise InvalidRequest(f"request body is not valid JSON{where}: {getattr(err, 'msg', err)}", param="body") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}", param="body")
    return data


class VertexPredictRequest(BaseModel):
    """Vertex AI's prediction body; each instance is an OpenAI chat or completion request."""

    model_config = ConfigDict(extra="forbid")
    instances: list[dict[str, Any]] = Field(min_length=1, max_length=64)
    parameters: dict[str, Any] | None = None


class LoadAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's route name): serve a registered adapter as ``<model>:<adapter>``."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=3, max_length=200, pattern=r"^[^:]+:[^:]+$")
    lora_path: str | None = Field(None, description="Not accepted: adapters come from the registry.")


_REQUEST_MODELS = {"chat": ChatCompletionRequest, "completion": CompletionRequest}


class _Timeout(Exception):
    def __init__(self, stage: str, timeout_s: float):
        super().__init__(stage, timeout_s)
        self.stage, self.timeout_s = stage, timeout_s


async def _first_item(gen, timeout_s: float, stage: str):
    """The next item of a response stream, waiting at most ``timeout_s``.

    Not ``asyncio.wait_for``: on timeout it waits for the cancelled call to unwind, and a
    request still queued for a replica that never starts may not unwind promptly.
    """
    task = asyncio.ensure_future(gen.__anext__())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        raise _Timeout(stage, timeout_s)
    return task.result()


async def _servable_ready() -> None:
    """Until Serve has registered this replica's instance, which its FastAPI routes resolve ``self`` from."""
    while serve.get_replica_context().servable_object is None:
        await asyncio.sleep(0.05)


def _cancel(gen) -> None:
    """Cancel a model call; a call that already failed re-raises its error from ``cancel``: it is over anyway."""
    try:
        gen.cancel()
    except Exception:
        pass


@serve.ingress(app)
class Ingress:
    """Routes each request to the deployment of the model it names."""

    async def __init__(
        self, server: dict[str, Any], models: dict[str, Any], deployments: dict[str, str], created: int,
        scale_to_zero: list[str] = (), local: dict[str, Any] | None = None, engines: dict[str, str] | None = None,
    ):
        """``models``: served name -> the DeploymentHandle of its model deployment. ``local``: instead, the
        arguments of one :class:`~homefire.serve.server.ModelServer` that runs in this replica (one hop: see
        :mod:`homefire.serve.local`) and ``max_requests``, its admission bound. ``engines``: served name -> engine
        kind; a model whose engine brings its own OpenAI layer (vLLM) is sent what homefire's request models do not
        cover (:class:`~homefire.serve.protocol.NativeRequest`)."""
        from homefire.serve.engines import engine_class

        self.cfg = ServerConfig.model_validate(server)
        self.handles = models  # served name -> DeploymentHandle (or LocalHandle)
        self.local: LocalHandle | None = None
        # The API's own HTTP server when Serve runs no proxy (homefire serve; serve run with proxy_location:
        # Disabled): bound now, so a taken port fails the deploy with the fix; serving once Serve knows this replica.
        addr = await own_http_address()
        sock = await bind_when_free(addr) if addr is not None else None
        if local is not None:
            from homefire.serve.builders import stream_interval_s
            from homefire.serve.server import ModelServer

            limit = local.pop("max_requests")
            # Behind Serve's proxy, streamed chunks cross a Ray hop again: batch them.
            interval = stream_interval_s(hop=sock is None, override=local.pop("stream_interval_override_s"))
            try:
                model = await ModelServer.create(**local, stream_interval_s=interval, restart_in_place=True)
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
            self.local = LocalHandle(model, limit)
            self.handles = {model.cfg.name: self.local}
        else:
            # Serve builds a handle's router on its first request; build them now, so each router hears its
            # replicas' engine stats from the start (GET /v1/status shows them before any traffic).
            for h in self.handles.values():
                if not h.is_initialized:
                    h._init()
        self.deployments = deployments  # deployment name -> served name
        self.engines = dict(engines or {})
        self.native = {name for name, kind in self.engines.items() if engine_class(kind).capabilities.native_openai}
        self.created = created
        self.scale_to_zero = set(scale_to_zero)
        keys = [k.get_secret_value() for k in self.cfg.api_keys]
        if self.cfg.api_key_env and os.environ.get(self.cfg.api_key_env):
            keys += [k.strip() for k in os.environ[self.cfg.api_key_env].split(",") if k.strip()]
        self.api_keys = [k.encode() for k in keys]
        self.metrics = ServeMetrics()
        self._ongoing: dict[str, int] = {}
        self.draining = False
        self.http: ApiServer | None = None
        if sock is not None:
            self.http = ApiServer(self._serve_asgi, sock, addr)
            self.http.start(asyncio.ensure_future(_servable_ready()))
            logger.info("API listening on http://%s:%d", addr.host, addr.port)

    async def _serve_asgi(self, scope, receive, send) -> None:
        """The app Serve built around this instance (set after ``__init__``), for the API's own server."""
        await self._asgi_app(scope, receive, send)

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: Request) -> None:
        if not self.api_keys or request.url.path in _PUBLIC:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if not token or not any(hmac.compare_digest(token, k) for k in self.api_keys):
            raise AuthenticationError(
                "missing or invalid API key; send it as 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}", param="body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", param="body")
            chunks.append(chunk)
        return b"".join(chunks)

    def _route(self, model: str) -> tuple[str, str, str | None]:
        base, _, adapter = model.partition(":")
        if base not in self.handles:
            raise ModelNotFound(
                f"model '{model}' is not served; served models: {', '.join(sorted(self.handles))}",
                param="model", code="model_not_found",
            )
        return base, model, adapter or None

    async def _generate(self, request: Request, native_route: str, route: str) -> Response:
        self._authorize(request)
        data = load_json_object(await self._read_body(request))
        return await self._dispatch(*self._parse(data, native_route), route)

    def _parse(self, data: dict, native_route: str) -> tuple[Any, str]:
        """(request, ModelServer method). homefire's own request model where it covers the request: the lean path;
        else, for a model whose engine has its own OpenAI layer, the body as is, for that layer to validate."""
        if native_route in _REQUEST_MODELS:
            try:
                return _REQUEST_MODELS[native_route].model_validate(data), native_route
            except ValidationError as err:
                if not beyond_lean(err, data):
                    raise validation_error(err) from None
                if self._served_natively(data) is None:
                    raise self._unsupported(err, data, native_route) from None
        elif self._served_natively(data) is None:
            model, engine = self._model_and_engine(data)
            raise InvalidRequest(
                f"model '{model}' runs on engine {engine}, which does not serve /v1/{native_route}; serve the model "
                "with engine vllm for this route", param="model", code="unsupported_by_engine",
            )
        return NativeRequest(native_route, data), "native"

    def _parse_either(self, data: dict) -> tuple[Any, str]:
        """One OpenAI request in the body of a managed-endpoint route: chat if it has `messages`, else a completion."""
        return self._parse(data, "chat" if "messages" in data else "completion")

    def _unsupported(self, err: ValidationError, data: dict, route: str) -> InvalidRequest:
        """A request beyond homefire's lean layer for a model whose engine has no OpenAI layer of its own: a field the
        API documents (tools, logprobs ...) is named as unsupported by that engine; any other is unknown."""
        from homefire.serve.openapi import documented_fields

        model, engine = self._model_and_engine(data)
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            if field in data and field in documented_fields(route):
                return InvalidRequest(
                    f"{field}: model '{model}' runs on engine {engine}, which does not support it. Fix: remove it, or "
                    "serve the model with engine vllm", param=field, code="unsupported_by_engine",
                )
        return validation_error(err)

    def _model_and_engine(self, data: dict) -> tuple[str, str]:
        """The request's served model (a 400 without one, a 404 for one not served) and its engine's kind."""
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model: field required; name one of the served models", param="model")
        base, _, _ = self._route(model)
        return model, self.engines.get(base, "?")

    def _served_natively(self, data: dict) -> str | None:
        """The request's model when its engine brings its own OpenAI layer."""
        model = data.get("model")
        if isinstance(model, str) and model.partition(":")[0] in self.native:
            return model
        return None

    async def _dispatch(self, req: Any, method: str, route: str) -> Response:
        if self.draining:
            raise ServiceUnavailable("the server is shutting down; send the request to another instance or retry",
                                     code="shutting_down")
        if req.n > self.cfg.max_n:
            raise InvalidRequest(f"n={req.n} is above this server's limit of {self.cfg.max_n}", param="n")
        base, _, adapter = self._route(req.model)
        started = time.perf_counter()
        self._ongoing[base] = self._ongoing.get(base, 0) + 1
        self.metrics.ongoing.labels(base).set(self._ongoing[base])
        gen, first = None, None
        try:
            gen, first = await self._first_answer(req, method, adapter, base)
        except BaseException:
            self._done(base, route, started)
            raise
        if req.stream:
            return StreamingResponse(self._relay(first, gen, base, route, started), media_type="text/event-stream")
        try:
            async for item in gen:
                if isinstance(item, dict):
                    self.metrics.observe_stats(base, item)
        finally:
            self._done(base, route, started, 200)
        return Response(first, media_type="application/json")

    async def _first_answer(self, req: Any, method: str, adapter: str | None, model: str) -> tuple[Any, str]:
        """Send the request to a replica of ``model``; (the response stream, its first item with output).

        A request whose replica or engine died before it answered anything is sent again (the router then picks
        a live replica, or waits for the replacement within the cold-start timeout): nothing was lost, nothing was
        sent twice to the client.
        """
        handle = self.handles[model].options(stream=True, method_name=method)
        deadline = time.monotonic() + self.cfg.cold_start_timeout_s
        for attempt in range(1 + self.cfg.retries):
            gen = None
            try:
                gen = handle.remote(req, adapter)  # a full queue refuses here (BackPressureError)
                # The replica answers "" once it has the request and the request passed its checks: this wait
                # covers queueing and scale-from-zero; a bad request surfaces here as its 4xx.
                await _first_item(gen, max(1.0, deadline - time.monotonic()), "cold start")
                first = await _first_item(gen, self.cfg.request_timeout_s, "first token" if req.stream else "request")
                return gen, first
            except asyncio.CancelledError:  # the client went away: so does its request
                if gen is not None:
                    _cancel(gen)
                raise
            except BaseException as err:
                if gen is not None:
                    _cancel(gen)
                herr = self._as_homefire(err, model)
                if not herr.retryable or attempt == self.cfg.retries or time.monotonic() > deadline:
                    raise herr from None
                self.metrics.retries.labels(model).inc()
                logger.warning("request to %s retried (attempt %d): %s", model, attempt + 2, herr.message)
                await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    def _as_homefire(self, err: BaseException, model: str) -> HomefireError:
        """Any failure of a model call as the homefire error a client sees: short, no Ray or engine internals
        (those go to the log)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(err, HomefireError):
            return err
        cause = getattr(err, "cause", None)
        if isinstance(cause, HomefireError):
            return cause
        if isinstance(err, _Timeout):
            if err.stage == "cold start":
                return ServiceUnavailable(
                    f"model '{model}' had no replica ready within {err.timeout_s:.0f}s (it may be scaling up from "
                    "zero, restarting, or short of resources: see GET /v1/status); retry later",
                    code="cold_start_timeout",
                )
            return ServiceUnavailable(
                f"model '{model}' did not answer within {err.timeout_s:.0f}s ({err.stage}); retry later",
                code="timeout",
            )
        if isinstance(err, BackPressureError):
            return Overloaded(
                f"model '{model}' is at capacity (its queue of {err.args[1]} waiting requests is full); retry after "
                "the Retry-After seconds", code="overloaded",
            )
        if isinstance(err, (ActorDiedError, ActorUnavailableError, RayActorError)) or isinstance(cause, RayActorError):
            logger.warning("a replica of %s went away: %s", model, err)
            return EngineDead(f"model '{model}' lost the replica serving this request; a new one is starting. "
                              "Retry shortly", code="replica_restarting")
        if isinstance(err, DeploymentUnavailableError):
            return ServiceUnavailable(f"model '{model}' failed to deploy: see GET /v1/status", code="deploy_failed")
        logger.error("request to %s failed", model, exc_info=err)
        return EngineError(f"model '{model}' failed to answer ({type(err).__name__}); the server log has the details")

    def _done(self, model: str, route: str, started: float, status: int | None = None):
        self._ongoing[model] = max(0, self._ongoing.get(model, 1) - 1)
        self.metrics.ongoing.labels(model).set(self._ongoing[model])
        if status is not None:
            self.metrics.requests.labels(model, route, str(status)).inc()
            self.metrics.e2e.labels(model).observe(time.perf_counter() - started)

    async def _relay(self, first: str, gen, model: str, route: str, started: float) -> AsyncIterator[str]:
        # The stream's last event ([DONE]) waits for the replica's stats, which follow it: a client that reads
        # /metrics as soon as its stream ends finds the request and its tokens counted.
        status, tail = 200, ""
        try:
            if first.endswith(_DONE_EVENT):
                tail = first
            else:
                yield first
            async for item in gen:
                if isinstance(item, dict):
                    self.metrics.observe_stats(model, item)
                elif item.endswith(_DONE_EVENT):
                    tail = item
                else:
                    yield item
        except (asyncio.CancelledError, GeneratorExit):  # client went away: stop the replica's work too
            _cancel(gen)
            raise
        except BaseException as err:
            status = 500
            herr = self._as_homefire(err, model)
            self.metrics.errors.labels(model, herr.type).inc()
            tail = error_event(herr)
        finally:
            self._done(model, route, started, status)
        if tail:
            yield tail

    # ------------------------------------------------------------------ routes
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._counted("chat", self._generate(request, "chat", "chat"))

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._counted("completions", self._generate(request, "completion", "completions"))

    @app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, for models served by vLLM (answered by vLLM's own Responses layer)."""
        return await self._counted("responses", self._generate(request, "responses", "responses"))

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        """Embeddings, for models served by vLLM with ``task: embed``."""
        return await self._counted("embeddings", self._generate(request, "embeddings", "embeddings"))

    async def _counted(self, route: str, call: Awaitable[Response]) -> Response:
        """Await an inference route; a homefire error becomes its OpenAI error response, counted in the metrics."""
        try:
            return await call
        except HomefireError as err:
            model = "-"
            self.metrics.requests.labels(model, route, str(err.status)).inc()
            self.metrics.errors.labels(model, err.type).inc()
            return error_response(err)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        """Served models, then the registry adapters each can serve as ``<model>:<adapter>``."""
        self._authorize(request)
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "homefire"} for name in sorted(self.handles)]
        for name in sorted(self.handles):
            if name in self.scale_to_zero:
                continue  # asking would wake a replica
            try:
                adapters = await asyncio.wait_for(
                    self.handles[name].options(method_name="available_adapters").remote(), constants.HEALTH_CHECK_TIMEOUT_S
                )
            except Exception as err:  # a busy, starting or timed-out replica must not fail the listing
                logger.info("adapters of %s not listed: %s", name, err)
                continue
            data += [{"id": f"{name}:{a}", "object": "model", "created": self.created, "owned_by": "homefire",
                      "parent": name} for a in adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        """Load a registry adapter on a replica of its model now (requests for it also load it on first use)."""
        return await self._counted("load_adapter", self._load_adapter(request))

    async def _load_adapter(self, request: Request) -> Response:
        self._authorize(request)
        body = validate_request(load_json_object(await self._read_body(request)), LoadAdapterRequest)
        if body.lora_path is not None:
            raise InvalidRequest(
                "lora_path is not accepted: homefire serves adapters from its registry. Fix: send only "
                "lora_name '<model>:<adapter>' after `homefire train` registered the adapter", param="lora_path",
            )
        base, _, adapter = self._route(body.lora_name)
        try:
            result = await asyncio.wait_for(
                self.handles[base].options(method_name="load_adapter").remote(adapter),
                constants.ADAPTER_LOAD_TIMEOUT_S + self.cfg.cold_start_timeout_s,
            )
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"model '{base}' did not load '{adapter}' in time; retry later", code="timeout") from None
        except BaseException as err:
            raise self._as_homefire(err, base) from None
        return JSONResponse({"object": "lora_adapter", "status": "loaded", **result})

    @app.get("/health")
    async def health(self) -> dict:
        """Liveness: the API process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: every model that keeps replicas (min_replicas > 0) has a running one, and no drain began."""
        ok, not_ready = await self._readiness()
        status = "draining" if self.draining else "ready" if ok else "not_ready"
        return JSONResponse({"status": status, "not_ready": not_ready}, status_code=200 if status == "ready" else 503)

    # ------------------------------------------------------------------ drain (called through a handle)
    async def drain(self) -> int:
        """Refuse new inference requests from now on (503, readiness down); returns the requests still in flight.
        ``homefire serve`` calls it on SIGTERM/SIGINT, then waits for :meth:`in_flight` to reach 0."""
        if not self.draining:
            logger.info("draining: new requests are refused, %d in flight", self.in_flight())
        self.draining = True
        return self.in_flight()

    def in_flight(self) -> int:
        """Inference requests accepted and not yet answered in full (streams included)."""
        return sum(self._ongoing.values())

    # ------------------------------------------------------------------ a model in this replica (called by Serve)
    async def check_health(self) -> None:
        if self.local is not None:
            await self.local.server.check_health()

    async def __del__(self):
        if self.http is not None:
            await self.http.stop()
        if self.local is not None:
            await self.local.server.__del__()

    @app.get("/v1/status")
    async def status(self, request: Request) -> dict:
        from homefire.serve.routing import replica_stats
        from homefire.serve.status import app_status

        self._authorize(request)
        st = await asyncio.to_thread(app_status, serve.get_replica_context().app_name, self.deployments)
        for name, dep in st["deployments"].items():
            # Each replica's engine stats as this ingress's router last heard them (every STATS_PERIOD_S).
            if (replicas := replica_stats(name)) is not None:
                dep["replicas"] = replicas
            elif self.local is not None and dep["model"] == self.local.server.cfg.name:
                dep["replicas"] = [{"replica": "local", **self.local.server.record_routing_stats()}]
        return st

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._authorize(request)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ managed-endpoint containers
    async def _readiness(self) -> tuple[bool, dict]:
        """Serve's replica states (not Ray's state API, which can stall while an actor is being replaced), answered
        within HEALTH_CHECK_TIMEOUT_S: a readiness probe that hangs is worse than one that says no."""
        from homefire.serve.status import app_status

        app = serve.get_replica_context().app_name
        try:
            st = await asyncio.wait_for(asyncio.to_thread(app_status, app, self.deployments, pending=False),
                                        constants.HEALTH_CHECK_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False, {name: "UNKNOWN (status did not answer in time)" for name in sorted(self.handles)}
        not_ready = {
            d["model"]: d["status"] for d in st["deployments"].values()
            if d["model"] is not None and d["model"] not in self.scale_to_zero and d["running"] == 0
        }
        if self.local is not None and self.local.server.restarting:
            not_ready[self.local.server.cfg.name] = "RESTARTING_ENGINE"
        return not not_ready, not_ready

    async def _invoke(self, request: Request, route: str) -> Response:
        """One OpenAI request in the body: chat if it has `messages`, else a text completion."""
        self._authorize(request)
        data = load_json_object(await self._read_body(request))
        return await self._dispatch(*self._parse_either(data), route)

    @app.get("/ping")
    async def sagemaker_ping(self) -> JSONResponse:
        """SageMaker health check: 200 once every model that keeps replicas has one running."""
        ok, not_ready = await self._readiness()
        ok = ok and not self.draining
        return JSONResponse({"status": "ok" if ok else "not_ready", "not_ready": not_ready}, status_code=200 if ok else 503)

    @app.post("/invocations")
    async def sagemaker_invocations(self, request: Request) -> Response:
        """SageMaker inference: the body is an OpenAI chat or completion request (streaming allowed)."""
        return await self._counted("invocations", self._invoke(request, "invocations"))

    @app.post("/score")
    async def azureml_score(self, request: Request) -> Response:
        """Azure ML online endpoint scoring route (set scoring_route to /score, liveness/readiness to /ping)."""
        return await self._counted("score", self._invoke(request, "score"))

    @app.get(VERTEX_HEALTH_ROUTE)
    async def vertex_health(self) -> JSONResponse:
        """Vertex AI health route (AIP_HEALTH_ROUTE)."""
        return await self.sagemaker_ping()

    @app.post(VERTEX_PREDICT_ROUTE)
    async def vertex_predict(self, request: Request) -> JSONResponse:
        """Vertex AI prediction (AIP_PREDICT_ROUTE): ``{"instances": [request, ...]}`` -> ``{"predictions": [...]}``.

        Each instance is an OpenAI chat or completion request, answered without streaming.
        """
        return await self._counted("vertex", self._vertex_predict(request))

    async def _vertex_predict(self, request: Request) -> JSONResponse:
        self._authorize(request)
        body = validate_request(load_json_object(await self._read_body(request)), VertexPredictRequest)
        predictions = []
        for i, instance in enumerate(body.instances):
            try:
                resp = await self._dispatch(*self._parse_either({**instance, "stream": False}), "vertex")
            except HomefireError as err:
                err.param = f"instances.{i}.{err.param}" if err.param else f"instances.{i}"
                raise
            predictions.append(json.loads(resp.body))
        return JSONResponse({"predictions": predictions})
