"""The naive baseline a tutorial would write: FastAPI + transformers ``generate`` per request, SSE streaming.

    python benchmarks/naive_server.py --model PATH [--served-model-name demo] [--host 127.0.0.1] [--port 8002]

Each request runs its own ``model.generate`` in a thread and streams each new token, through a streamer and a
queue, as OpenAI ``/v1/completions`` server-sent events. There is no batching across requests: concurrent requests run
concurrent ``generate`` calls that compete for the same cores. That is the point: ``serve_bench.py`` measures
homefire and bare vLLM against this. It is kept as simple as a tutorial, but it is correct: the usage chunk
(``stream_options.include_usage``) counts generated tokens, ``ignore_eos`` is honoured (``min_new_tokens``), and a
generation that fails mid-stream sends an error event and ``[DONE]``, and every token gets its own event.
(transformers' ``TextIteratorStreamer``, the usual tutorial choice, holds text back until it sees a space; this
model's output often has none, so the first event would arrive with the last token and TTFT would be meaningless.)
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from typing import Any, Iterator

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

#: Longest wait for the next piece of text from a running ``generate`` before the stream gives up.
TOKEN_TIMEOUT_S = 600.0


class TokenStreamer(BaseStreamer):
    """Hands each token ``generate`` produces to the HTTP stream as soon as it exists."""

    def __init__(self, timeout_s: float):
        self.tokens: queue.Queue[list[int] | None] = queue.Queue()
        self.timeout_s = timeout_s
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call carries the prompt
            self._prompt_seen = True
            return
        self.tokens.put(value.view(-1).tolist())

    def end(self) -> None:
        self.tokens.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self.tokens.get(timeout=self.timeout_s)) is not None:
            yield ids


class CompletionRequest(BaseModel):
    """The ``/v1/completions`` fields this server uses; other fields (``repetition_penalty``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False


def create_app(model_path: str, served_model_name: str) -> FastAPI:
    """A FastAPI app serving ``model_path`` under the name ``served_model_name``."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    app = FastAPI(title="naive transformers server")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=status)

    def generate_kwargs(req: CompletionRequest) -> tuple[dict[str, Any], int]:
        if isinstance(req.prompt, str):
            input_ids = tokenizer(req.prompt, return_tensors="pt").input_ids
        else:
            input_ids = torch.tensor([req.prompt], dtype=torch.long)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=req.max_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            kwargs.update(do_sample=False)
        if req.ignore_eos:
            kwargs["min_new_tokens"] = req.max_tokens
        return kwargs, input_ids.shape[1]

    def chunk(rid: str, created: int, text: str, finish: str | None) -> str:
        body = {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                             "owned_by": "naive"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        if req.model != served_model_name:
            return error(404, f"model '{req.model}' is not served; served models: {served_model_name}")
        kwargs, prompt_len = generate_kwargs(req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            with torch.no_grad():
                out = model.generate(**kwargs)
            new = out[0, prompt_len:]
            n = int(new.shape[0])
            return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                    "choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True),
                                 "logprobs": None, "finish_reason": "length" if n >= req.max_tokens else "stop"}],
                    "usage": {"prompt_tokens": prompt_len, "completion_tokens": n,
                              "total_tokens": prompt_len + n}}

        streamer = TokenStreamer(TOKEN_TIMEOUT_S)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    out = model.generate(**kwargs, streamer=streamer)
                result["completion_tokens"] = int(out.shape[1]) - prompt_len
            except Exception as err:  # reported to the client as an error event below
                result["error"] = f"{type(err).__name__}: {err}"
                streamer.end()  # unblocks the iteration below

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def events() -> Iterator[str]:
            # A sync generator: Starlette iterates it in a worker thread, so waiting on the streamer
            # does not block the event loop.
            ids: list[int] = []
            sent, finish = "", None
            for new_ids in streamer:
                ids += new_ids
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest of its bytes
                    text = sent
                # The last token's event carries the finish reason, as vLLM's does.
                if len(ids) >= req.max_tokens:
                    finish = "length"
                elif ids[-1] in eos_ids and not req.ignore_eos:
                    finish = "stop"
                yield chunk(rid, created, text[len(sent):], finish)
                sent = text
            thread.join()
            if "error" in result:
                err = {"error": {"message": result["error"], "type": "internal_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
                return
            n = result["completion_tokens"]
            if finish is None:  # generate stopped for a reason seen only here (e.g. the model's length limit)
                yield chunk(rid, created, "", "length")
            if (req.stream_options or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
                body = {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                        "choices": [], "usage": usage}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model directory (or hub id) for transformers")
    p.add_argument("--served-model-name", default="demo", help="the id clients put in `model` (default: demo)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8002, help="port (default: 8002)")
    args = p.parse_args(argv)
    uvicorn.run(create_app(args.model, args.served_model_name), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
