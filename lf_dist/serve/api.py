"""`lf-dist api`: an OpenAI-compatible chat server (FastAPI + uvicorn) over one ChatEngine.

Environment (LLaMA-Factory's names): API_HOST (default 127.0.0.1: reachable from this machine only; set
0.0.0.0 to serve a network), API_PORT (8000), API_KEY (Bearer token; unset: no auth), API_MODEL_NAME (the id
in /v1/models; default the model folder's name). lf-dist's own: API_MAX_CONCURRENT generations at once
(default 1: one model, one device) and API_MAX_QUEUE requests waiting behind them (default 64); past that a
request gets 429 and the server keeps serving the others.

A malformed request is a 4xx in OpenAI's error shape, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from pathlib import Path

from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.serve import protocol as p

logger = get_logger(__name__)


class Gate:
    """At most `concurrent` requests generate, `queue` more wait; anyone past that is turned away (429)."""

    def __init__(self, concurrent: int, queue: int):
        self.slots = asyncio.Semaphore(concurrent)
        self.limit, self.inside = concurrent + queue, 0

    def enter(self) -> None:
        if self.inside >= self.limit:
            raise p.RequestError(429, "the server is busy; retry shortly", code="rate_limit_exceeded")
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


def _int_env(name: str, default: int, minimum: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < minimum:
        raise UserError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def create_app(engine, model_name: str, api_key: str | None, concurrent: int = 1, queue: int = 64):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException

    from lf_dist.serve.engine import Answer, Sampling

    app = FastAPI(title="lf-dist", docs_url=None, redoc_url=None)
    gate = Gate(concurrent, queue)

    def error(err: p.RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(p.RequestError)
    async def _refused(request: Request, err: p.RequestError):
        return error(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return error(p.RequestError(400, "the request body is not valid JSON"))
        return error(p.RequestError(400, f"{loc}: {first.get('msg')}" if loc else first.get("msg"), param=loc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return error(p.RequestError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        logger.info(f"error while serving {request.url.path}: {type(err).__name__}: {err}")
        return error(p.RequestError(500, "internal error while generating"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(p.RequestError(401, "invalid or missing API key", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "owner"}]}

    def sampling(req: p.ChatRequest) -> Sampling:
        s = engine.default_sampling()
        limit = req.max_completion_tokens or req.max_tokens
        if limit is not None:
            if limit > engine.context_length:
                raise p.RequestError(400, f"max_tokens: at most {engine.context_length}", param="max_tokens")
            s.max_new_tokens = limit
        if req.temperature is not None:
            s.temperature, s.do_sample = req.temperature, req.temperature > 0
        if req.top_p is not None:
            s.top_p = req.top_p
        s.stop = req.stop_list()
        return s

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatRequest):
        if req.model != model_name:
            raise p.RequestError(
                404,
                f"the model '{req.model}' does not exist (this server: {model_name})",
                param="model",
                code="model_not_found",
            )
        if req.n != 1:
            raise p.RequestError(400, "n: only 1 is supported", param="n")
        if req.stop is not None and len(req.stop_list()) > 4:
            raise p.RequestError(400, "stop: at most 4 sequences", param="stop")
        system, turns = p.split_messages(req.messages)
        s = sampling(req)
        cid = p.new_id()
        gate.enter()
        if not req.stream:
            try:
                async with gate.slots:
                    answer = await run_in_threadpool(engine.chat, turns, s, system)
            except UserError as err:
                raise p.RequestError(400, str(err), param="messages", code="context_length_exceeded") from None
            finally:
                gate.leave()
            return p.completion(cid, model_name, answer.text, answer.finish_reason, p.usage_of(answer))
        return StreamingResponse(_events(cid, turns, s, system, req), media_type="text/event-stream")

    async def _events(cid, turns, s, system, req):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        answer = Answer()
        try:
            async with gate.slots:
                yield sse(p.chunk(cid, model_name, {"role": "assistant", "content": ""}))
                try:
                    async for piece in iterate_in_threadpool(engine.stream(turns, s, system, answer)):
                        yield sse(p.chunk(cid, model_name, {"content": piece}))
                except UserError as err:  # the headers are sent: the error goes in the stream
                    yield sse(p.RequestError(400, str(err), code="context_length_exceeded").body())
                    return
                yield sse(p.chunk(cid, model_name, {}, finish=answer.finish_reason))
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(p.chunk(cid, model_name, {}, usage=p.usage_of(answer)))
                yield "data: [DONE]\n\n"
        finally:
            gate.leave()

    return app


def run_api(cfg) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"lf-dist api needs {' and '.join(missing)} (pip install 'lf-dist[serve]')")
    import uvicorn

    from lf_dist.serve.engine import ChatEngine

    host = os.environ.get("API_HOST", "127.0.0.1")
    port = _int_env("API_PORT", 8000, 1)
    concurrent, queue = _int_env("API_MAX_CONCURRENT", 1, 1), _int_env("API_MAX_QUEUE", 64, 0)
    engine = ChatEngine(cfg)
    name = os.environ.get("API_MODEL_NAME") or Path(cfg.model.model_name_or_path).name
    app = create_app(engine, name, os.environ.get("API_KEY") or None, concurrent, queue)
    auth = "Bearer API_KEY required" if os.environ.get("API_KEY") else "no API key"
    logger.info(f"serving '{name}' on http://{host}:{port}/v1 ({auth}; {concurrent} at a time, {queue} waiting)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
