"""OpenAI's chat-completions wire format: the request as a validated pydantic model, the conversation in the
template's roles (tool calls and tool results included), responses, stream chunks, and errors in OpenAI's shape
({"error": {"message", "type", "param", "code"}}). Which request fields are honoured: `lf_dist/serve/fields.py`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    # an assistant message handed back as the client got it carries fields with no bearing on the prompt
    # (refusal, annotations, audio: null); they are dropped
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `strict` and the like: schema hints for OpenAI's own decoder

    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # every other field is checked by fields.check_fields

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
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | dict | str | None = None
    parallel_tool_calls: bool | None = None
    seed: int | None = None
    # LLaMA-Factory's and vLLM's extensions (`extra_body` in the openai client)
    do_sample: bool | None = None
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def tools_json(self) -> str | None:
        """The tools as the template renders them (the function objects, as LLaMA-Factory's API passes them);
        None without tools or with tool_choice none."""
        if not self.tools or self.tool_choice == "none":
            return None
        return json.dumps([t.function.model_dump() for t in self.tools], ensure_ascii=False)


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


def _function_turn(m: Message, i: int) -> dict:
    """An assistant message with tool_calls as the template's function turn. The arguments are decoded, so the
    call is rendered as the model wrote it (LLaMA-Factory's API would render them as a JSON string); the
    message's text beside the calls is dropped, as LLaMA-Factory does."""
    calls = []
    for j, call in enumerate(m.tool_calls):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            where = f"messages[{i}].tool_calls[{j}].function.arguments"
            raise RequestError(400, f"{where}: not valid JSON", param=where) from None
        calls.append({"name": call.function.name, "arguments": arguments})
    return {"role": "function", "content": json.dumps(calls, ensure_ascii=False)}


def split_messages(messages: list[Message]) -> tuple[str | None, list[dict]]:
    """(system prompt, the turns in the template's roles); the turns must alternate the user side (user, tool
    results) and the assistant side (an answer or tool calls) and end on the user side. Consecutive tool results
    are one observation, joined as the training data converter joins them."""
    system = None
    if messages[0].role in ("system", "developer"):
        system, messages = messages[0].text(), messages[1:]
    turns: list[dict] = []
    for i, m in enumerate(messages, start=1 if system is not None else 0):
        if m.role in ("system", "developer"):
            raise RequestError(400, "a system message may only come first", param="messages")
        if m.role in ("tool", "function") and turns and turns[-1]["role"] == "observation":
            turns[-1]["content"] += "\n</tool_response>\n<tool_response>\n" + m.text()
            continue
        user_side = m.role in ("user", "tool", "function")
        if user_side != (len(turns) % 2 == 0):
            raise RequestError(
                400, "messages must alternate user and assistant, starting with user", param=f"messages[{i}]"
            )
        if m.role == "assistant" and m.tool_calls:
            turns.append(_function_turn(m, i))
        else:
            role = {"user": "user", "assistant": "assistant"}.get(m.role, "observation")
            turns.append({"role": role, "content": m.text()})
    if not turns or len(turns) % 2 == 0:
        raise RequestError(400, "the last message must be from the user (or a tool)", param="messages")
    return system, turns


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}" if prefix == "chatcmpl" else f"{prefix}_{uuid.uuid4().hex}"


def tool_calls(calls: list[tuple[str, str]]) -> list[dict]:
    """OpenAI's tool_calls of (name, arguments JSON) pairs, each with a fresh `call_<hex>` id."""
    return [
        {"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}
        for name, arguments in calls
    ]


def completion(cid: str, model: str, message: dict, finish: str, usage: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
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
