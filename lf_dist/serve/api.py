"""`lf-dist api`: an OpenAI-compatible chat server (FastAPI + uvicorn) over one ChatEngine.

Routes: GET /v1/models (the served name), POST /v1/chat/completions (any model name: the answer carries the name
asked for), GET /health (no key needed). Fields honoured or refused: `lf_dist/serve/fields.py`. With `tools`, the
prompt shows them in the template's tool format and an answer that is a call in that format comes back as
`tool_calls` (finish_reason tool_calls); a stream with tools sends the answer once it is complete.

Settings: `--host` / `--port`, else API_HOST (default 127.0.0.1: reachable from this machine only) / API_PORT
(8000); a host other than loopback gets a warning at start-up. API_KEY (Bearer token; unset: no auth),
API_MODEL_NAME (the id in /v1/models; default the model folder's name). lf-dist's own: API_MAX_CONCURRENT
generations at once (default 1: one model, one device) and API_MAX_QUEUE requests waiting behind them (default
64); past that a request gets 429 and the server keeps serving the others.

A client that goes away (a closed stream, a dropped connection) cancels its generation at the next token. One
access-log line per request on stderr (`lf_dist/serve/middleware.py`). A malformed request is a 4xx in OpenAI's
error shape, never a 500.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request, imported late so a
# missing fastapi is one line) as objects

import asyncio
import ipaddress
import os
from pathlib import Path

from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.serve import protocol as p
from lf_dist.serve.fields import check_fields

logger = get_logger(__name__)


class Gate:
    """At most `concurrent` requests generate, `queue` more wait; anyone past that is turned away (429)."""

    def __init__(self, concurrent: int, queue: int):
        self.slots = asyncio.Semaphore(concurrent)
        self.limit, self.inside = concurrent + queue, 0

    def enter(self):
        """A ticket to leave by (once, however the request ends)."""
        if self.inside >= self.limit:
            raise p.RequestError(429, "the server is busy; retry shortly", code="rate_limit_exceeded")
        self.inside += 1
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left, self.inside = True, self.inside - 1

        return leave


def _int_env(name: str, default: int, minimum: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < minimum:
        raise UserError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def create_app(engine, model_name: str, api_key: str | None, concurrent: int = 1, queue: int = 64):
    from fastapi import FastAPI

    from lf_dist.serve.middleware import Door

    app = FastAPI(title="lf-dist", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Door, api_key=api_key)
    _add_error_handlers(app)
    _add_info_routes(app, model_name)
    _add_chat_route(app, engine, Gate(concurrent, queue))
    return app


def _add_error_handlers(app) -> None:
    """Every refusal, malformed request or crash answers in OpenAI's error shape."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

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


def _add_info_routes(app, model_name: str) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "owner"}]}


def _sampling(engine, req: p.ChatRequest):
    s = engine.default_sampling()
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None:
        if limit > engine.context_length:
            raise p.RequestError(400, f"max_tokens: at most {engine.context_length}", param="max_tokens")
        s.max_new_tokens = limit
    if req.temperature is not None:
        s.temperature, s.do_sample = req.temperature, req.temperature > 0
    if req.do_sample is not None:
        s.do_sample = req.do_sample
    for name in ("top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(req, name) is not None:
            setattr(s, name, getattr(req, name))
    s.stop = req.stop_list()
    return s


def _prepare(engine, req: p.ChatRequest):
    from lf_dist.serve.engine import ContextTooLong

    check_fields(req)
    system, turns = p.split_messages(req.messages)
    tools = req.tools_json()
    s = _sampling(engine, req)
    try:
        return engine.prepare(turns, s, system, tools), tools
    except ContextTooLong as err:
        raise p.RequestError(400, str(err), param="messages", code="context_length_exceeded") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        if not tools and all(t["role"] != "function" for t in turns):
            raise
        where = "tools" if tools else "messages"  # tools or calls the tool format cannot render
        message = f"{where}: cannot be rendered in the template's tool format: {type(err).__name__}: {err}"
        raise p.RequestError(400, message, param=where) from None


def _add_chat_route(app, engine, gate: Gate) -> None:
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    from lf_dist.serve.replies import answer_once, event_stream

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatRequest, request: Request):
        generation, tools = await run_in_threadpool(_prepare, engine, req)
        tool_format = engine.template.tool_format if tools else None  # read the answer's calls in this format
        leave = gate.enter()
        request.state.generation = generation  # the access log reads its token counts
        if not req.stream:
            try:
                async with gate.slots:
                    return await answer_once(generation, request, req, tool_format)
            finally:
                leave()
        return event_stream(generation, req, tool_format, gate.slots, leave)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to any interface
        return False


def run_api(cfg, host: str | None = None, port: int | None = None) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"lf-dist api needs {' and '.join(missing)} (pip install 'lf-dist[serve]')")
    import uvicorn

    from lf_dist.serve.engine import ChatEngine

    host = host or os.environ.get("API_HOST", "127.0.0.1")
    port = port if port is not None else _int_env("API_PORT", 8000, 1)
    if not 1 <= port <= 65535:
        raise UserError(f"--port: expected a TCP port from 1 to 65535, got {port}")
    concurrent, queue = _int_env("API_MAX_CONCURRENT", 1, 1), _int_env("API_MAX_QUEUE", 64, 0)
    api_key = os.environ.get("API_KEY") or None
    engine = ChatEngine(cfg)
    name = os.environ.get("API_MODEL_NAME") or Path(cfg.model.model_name_or_path).name
    app = create_app(engine, name, api_key, concurrent, queue)
    auth = "Bearer API_KEY required" if api_key else "no API key"
    logger.info(f"serving '{name}' on http://{host}:{port}/v1 ({auth}; {concurrent} at a time, {queue} waiting)")
    if not _is_loopback(host):
        who = "callers need API_KEY" if api_key else "no API_KEY is set: anyone who reaches it can use it"
        logger.info(f"warning: host {host} is not loopback: the model is reachable from the network ({who})")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
