"""The server's door (plain ASGI, so streams pass through untouched): the API key check and one access-log line
per request on stderr, in lf-dist's logger format:

    [lf-dist] 127.0.0.1 POST /v1/chat/completions 200 812 ms prompt_tokens=12 completion_tokens=30

A handler that generated puts its Generation in `request.state.generation`; the line is written when the response
has ended (a stream included), with the tokens generated and whether the client went away before the end.
"""

from __future__ import annotations

import hmac
import json
import time

from lf_dist.log import get_logger

logger = get_logger("lf_dist.serve.access")

OPEN_PATHS = frozenset({"/health"})  # answered without a key: for load balancers and process supervisors


class Door:
    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # an exception that escapes is answered 500 further out
        state = scope.setdefault("state", {})

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._refused(scope):
                await _json(send_and_note, 401, _error("invalid or missing API key", "invalid_api_key"))
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            _log(scope, status, (time.perf_counter() - start) * 1000, state.get("generation"))

    def _refused(self, scope) -> bool:
        if not self.api_key or scope["path"] in OPEN_PATHS:
            return False
        given = dict(scope["headers"]).get(b"authorization", b"")
        return not hmac.compare_digest(given, f"Bearer {self.api_key}".encode())


def _error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "authentication_error", "param": None, "code": code}}


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _log(scope, status: int, ms: float, generation) -> None:
    client = (scope.get("client") or ("-",))[0]
    line = f"{client} {scope['method']} {scope['path']} {status} {ms:.0f} ms"
    if generation is not None:
        line += f" prompt_tokens={generation.prompt_tokens} completion_tokens={generation.completion_tokens}"
        if generation.cancelled:
            line += " (cancelled: the client went away)"
    logger.info(line)
