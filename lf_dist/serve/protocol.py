"""OpenAI's chat-completions wire format: the request as a validated pydantic model, responses, stream chunks,
and errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}})."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a local model has no use for

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class RequestError(Exception):
    """A request the server refuses, answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def split_messages(messages: list[Message]) -> tuple[str | None, list[dict]]:
    """(system prompt, the turns in the template's roles); the turns must alternate user (or tool) and
    assistant and end on the user side, as a chat template renders them."""
    system = None
    if messages[0].role == "system":
        system, messages = messages[0].text(), messages[1:]
    turns = []
    for i, m in enumerate(messages):
        if m.role == "system":
            raise RequestError(400, "a system message may only come first", param="messages")
        user_side = m.role in ("user", "tool", "function")
        if user_side != (i % 2 == 0):
            raise RequestError(
                400, "messages must alternate user and assistant, starting with user", param=f"messages[{i}]"
            )
        role = {"user": "user", "assistant": "assistant"}.get(m.role, "observation")
        turns.append({"role": role, "content": m.text()})
    if not turns or len(turns) % 2 == 0:
        raise RequestError(400, "the last message must be from the user (or a tool)", param="messages")
    return system, turns


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(cid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": usage,
    }


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def usage_of(answer) -> dict:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
