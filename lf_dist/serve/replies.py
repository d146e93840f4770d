"""The two ways an answer goes back: one JSON body, or server-sent events as the tokens come. Either way the
generation is cancelled when the client goes away, and the text is read off the generation's thread without
holding anything a later request needs.
"""

from __future__ import annotations

import asyncio
import json

import anyio
import anyio.to_thread
from starlette.responses import StreamingResponse

from lf_dist.data.tool_formats import extract_calls
from lf_dist.log import get_logger
from lf_dist.serve import protocol as p

logger = get_logger(__name__)


def _message(text: str, generation, req: p.ChatRequest, tool_format: str | None) -> tuple[dict, str]:
    """(the assistant message, finish_reason): with tools, an answer that is a call becomes tool_calls."""
    if tool_format is not None:
        calls = extract_calls(tool_format, text)
        if isinstance(calls, list):
            calls = calls[:1] if req.parallel_tool_calls is False else calls
            return {"content": None, "tool_calls": p.tool_calls(calls)}, "tool_calls"
    return {"content": text}, generation.finish_reason


async def _next(generation) -> str | None:
    # abandoned on cancellation: the thread returns by itself once the cancelled generation ends
    return await anyio.to_thread.run_sync(generation.next_piece, abandon_on_cancel=True)


async def _all(generation) -> str:
    return await anyio.to_thread.run_sync(lambda: "".join(generation), abandon_on_cancel=True)


async def _cancel_on_disconnect(request, generation) -> None:
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a connection that broke is one that went away
        pass
    generation.cancel()


async def answer_once(generation, request, req: p.ChatRequest, tool_format: str | None) -> dict:
    generation.start()
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, generation))
    try:
        text = await _all(generation)
    finally:
        watcher.cancel()
        generation.cancel()  # a no-op once it has ended; stops it if this request was cancelled
    message, finish = _message(text, generation, req, tool_format)
    return p.completion(p.new_id(), req.model, message, finish, p.usage_of(generation))


class _Stream(StreamingResponse):
    """Server-sent events that always run `cleanup` when the response ends: finished, failed, or cancelled because
    the client went away (Starlette then leaves the body iterator suspended where it was, never closed)."""

    def __init__(self, body, cleanup):
        super().__init__(body, media_type="text/event-stream")
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.cleanup()


def event_stream(generation, req: p.ChatRequest, tool_format: str | None, slots, leave) -> StreamingResponse:
    cid = p.new_id()

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def events():
        async with slots:
            generation.start()
            yield sse(p.chunk(cid, req.model, {"role": "assistant", "content": ""}))
            try:
                if tool_format is not None:  # a call is only known once the answer is complete
                    message, finish = _message(await _all(generation), generation, req, tool_format)
                    if message.get("tool_calls"):
                        message["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                    yield sse(p.chunk(cid, req.model, {k: v for k, v in message.items() if v is not None}))
                else:
                    while (piece := await _next(generation)) is not None:
                        yield sse(p.chunk(cid, req.model, {"content": piece}))
                    finish = generation.finish_reason
            except Exception as err:  # noqa: BLE001 - the headers are sent: the error goes in the stream
                logger.info(f"error while generating: {type(err).__name__}: {err}")
                yield sse(p.RequestError(500, "internal error while generating").body())
                return
            yield sse(p.chunk(cid, req.model, {}, finish=finish))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(p.chunk(cid, req.model, {}, usage=p.usage_of(generation)))
            yield "data: [DONE]\n\n"

    async def cleanup():
        generation.cancel()
        await anyio.to_thread.run_sync(generation.wait)  # the access log then counts the tokens it made
        leave()

    return _Stream(events(), cleanup)
