"""Tool descriptions (system side) and function calls (assistant side) as text, per LLaMA-Factory tool format.

`tools` in a dataset is a JSON list of function schemas; a `function` turn's content is a JSON call (or list of
calls) with `name` and `arguments`. Each format renders them the way the model family expects, and reads a
model's answer back into calls (`extract_calls`, for the API).
"""

from __future__ import annotations

import json
import re
from datetime import datetime

DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)
GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)
LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)

Call = tuple[str, str]  # (name, arguments as a JSON string)


def _as_function(tool: dict) -> dict:
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _default_tools(tools: list[dict]) -> str:
    tool_text, names = "", []
    for tool in map(_as_function, tools):
        params = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
            items = (
                ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
            )
            params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        tool_text += (
            f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        )
        names.append(tool["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))


def _glm4_tools(tools: list[dict]) -> str:
    text = ""
    for tool in map(_as_function, tools):
        body = json.dumps(tool, indent=4, ensure_ascii=False)
        text += f"\n\n## {tool['name']}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    return GLM4_TOOL_PROMPT.format(tool_text=text)


def _llama3_tools(tools: list[dict]) -> str:
    text = "".join(json.dumps(_wrapped(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    return LLAMA3_TOOL_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=text)


def _mistral_tools(tools: list[dict]) -> str:
    return "[AVAILABLE_TOOLS] " + json.dumps([_wrapped(t) for t in tools], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"


def _qwen_tools(tools: list[dict]) -> str:
    return QWEN_TOOL_PROMPT.format(
        tool_text="".join("\n" + json.dumps(_wrapped(t), ensure_ascii=False) for t in tools)
    )


def _default_calls(calls: list[Call]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {args}" for name, args in calls)


def _glm4_calls(calls: list[Call]) -> str:
    if len(calls) > 1:
        raise ValueError("GLM-4 does not support parallel functions")
    return f"{calls[0][0]}\n{calls[0][1]}"


def _llama3_calls(calls: list[Call]) -> str:
    objs = [{"name": name, "parameters": json.loads(args)} for name, args in calls]
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


def _mistral_calls(calls: list[Call]) -> str:
    return json.dumps([{"name": name, "arguments": json.loads(args)} for name, args in calls], ensure_ascii=False)


def _qwen_calls(calls: list[Call]) -> str:
    texts = [json.dumps({"name": name, "arguments": json.loads(args)}, ensure_ascii=False) for name, args in calls]
    return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)


TOOL_FORMATS = {
    "default": (_default_tools, _default_calls),
    "glm4": (_glm4_tools, _glm4_calls),
    "llama3": (_llama3_tools, _llama3_calls),
    "mistral": (_mistral_tools, _mistral_calls),
    "qwen": (_qwen_tools, _qwen_calls),
}


def format_tools(tool_format: str, tools_json: str) -> str:
    """The system-side tool description; '' for an empty list."""
    tools = json.loads(tools_json)
    return TOOL_FORMATS[tool_format][0](tools) if len(tools) != 0 else ""


def parse_calls(content: str) -> list[Call]:
    calls = json.loads(content)
    calls = calls if isinstance(calls, list) else [calls]
    return [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]


def format_calls(tool_format: str, calls: list[Call]) -> str:
    return TOOL_FORMATS[tool_format][1](calls)


# -- a model's answer back into calls: the inverse of each format's calls (LLaMA-Factory's tool extractors) ------


def _json_calls(content: str, arguments_key: str) -> str | list[Call]:
    """A JSON call or list of calls with `name` and `arguments_key` (llama3: parameters, mistral: arguments)."""
    try:
        calls = json.loads(content.strip())
    except json.JSONDecodeError:
        return content
    calls = calls if isinstance(calls, list) else [calls]
    try:
        return [(c["name"], json.dumps(c[arguments_key], ensure_ascii=False)) for c in calls]
    except (KeyError, TypeError):
        return content


def _default_extract(content: str) -> str | list[Call]:
    pattern = re.compile(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)
    calls = []
    for name, args in re.findall(pattern, content):
        try:
            arguments = json.loads(args.strip().strip('"').strip("`"))  # as LLaMA-Factory: quotes, code fences
        except json.JSONDecodeError:
            return content
        calls.append((name.strip(), json.dumps(arguments, ensure_ascii=False)))
    return calls or content


def _glm4_extract(content: str) -> str | list[Call]:
    if "\n" not in content:
        return content
    name, args = content.split("\n", maxsplit=1)
    try:
        arguments = json.loads(args.strip())
    except json.JSONDecodeError:
        return content
    return [(name, json.dumps(arguments, ensure_ascii=False))]


def _qwen_extract(content: str) -> str | list[Call]:
    blocks = re.findall(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", content, re.DOTALL)
    calls = []
    for block in blocks:
        try:
            call = json.loads(block.strip())
        except json.JSONDecodeError:
            return content
        if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
            return content
        calls.append((call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
    return calls or content


EXTRACTORS = {
    "default": _default_extract,
    "glm4": _glm4_extract,
    "llama3": lambda content: _json_calls(content, "parameters"),
    "mistral": lambda content: _json_calls(content, "arguments"),
    "qwen": _qwen_extract,
}


def extract_calls(tool_format: str, content: str) -> str | list[Call]:
    """The calls in a model's answer as (name, arguments JSON) pairs, or the answer itself when it is not a valid
    call in `tool_format` (LLaMA-Factory's rule: text that is not a call is plain content)."""
    return EXTRACTORS[tool_format](content)
