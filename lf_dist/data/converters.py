"""Convert alpaca / sharegpt / openai records into one aligned shape, as LLaMA-Factory does.

Aligned record: `_prompt` (list of {role, content}, ending with a user turn), `_response` (one assistant
turn for sft, [chosen, rejected] for ranking data, [answer, ""] / ["", answer] for kto), `_system`, `_tools`.
A record that cannot be aligned comes out with empty `_prompt` and `_response` and is dropped later.
"""

from __future__ import annotations

from lf_dist.data.registry import DatasetAttr

USER, ASSISTANT, SYSTEM, OBSERVATION, FUNCTION = "user", "assistant", "system", "observation", "function"


def _msg(role: str, content) -> dict:
    return {
        "role": role,
        "content": content if isinstance(content, str) else ("" if content is None else str(content)),
    }


def _role_map(tag: dict) -> dict:
    return {
        tag["user_tag"]: USER,
        tag["assistant_tag"]: ASSISTANT,
        tag["observation_tag"]: OBSERVATION,
        tag["function_tag"]: FUNCTION,
        tag["system_tag"]: SYSTEM,
    }


def _kto_response(answer: dict, tag) -> list[dict]:
    empty = _msg(ASSISTANT, "")
    return [answer, empty] if tag else [empty, answer]


def convert_alpaca(example: dict, attr: DatasetAttr) -> dict:
    col = attr.columns
    prompt = []
    history = example.get(col["history"]) if col.get("history") else None
    if isinstance(history, list):
        for turn in history:
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                prompt += [_msg(USER, turn[0]), _msg(ASSISTANT, turn[1])]
    query = [example[col[k]] for k in ("prompt", "query") if col.get(k) and example.get(col[k])]
    prompt.append(_msg(USER, "\n".join(str(q) for q in query)))
    kto_tag = example.get(col["kto_tag"]) if col.get("kto_tag") else None
    response_col = col.get("response")
    if col.get("kto_tag"):
        response = (
            _kto_response(_msg(ASSISTANT, example.get(response_col)), kto_tag) if isinstance(kto_tag, bool) else []
        )
    elif attr.ranking:
        chosen, rejected = example.get(col.get("chosen")), example.get(col.get("rejected"))
        ok = isinstance(chosen, str) and isinstance(rejected, str) and chosen and rejected
        response = [_msg(ASSISTANT, chosen), _msg(ASSISTANT, rejected)] if ok else []
    elif response_col and isinstance(example.get(response_col), str) and example[response_col]:
        response = [_msg(ASSISTANT, example[response_col])]
    else:
        response = []
    return _aligned(
        prompt,
        response,
        example.get(col["system"], "") if col.get("system") else "",
        example.get(col["tools"], "") if col.get("tools") else "",
    )


def convert_sharegpt(example: dict, attr: DatasetAttr) -> dict:
    col, tag = attr.columns, attr.tags
    role_of = _role_map(tag)
    odd, even = (tag["user_tag"], tag["observation_tag"]), (tag["assistant_tag"], tag["function_tag"])
    messages = example.get(col["messages"]) or []
    if not isinstance(messages, list):
        return _aligned([], [], "", "")
    system = example.get(col["system"], "") if col.get("system") else ""
    if messages and isinstance(messages[0], dict) and messages[0].get(tag["role_tag"]) == tag["system_tag"]:
        system, messages = messages[0].get(tag["content_tag"], ""), messages[1:]
    aligned, broken = [], False
    for i, message in enumerate(messages):
        role = message.get(tag["role_tag"]) if isinstance(message, dict) else None
        if role not in (odd if i % 2 == 0 else even):
            broken = True
            break
        aligned.append(_msg(role_of[role], message.get(tag["content_tag"])))
    return _finish(example, attr, aligned, system, broken, even_roles=even, role_of=role_of)


def convert_openai(example: dict, attr: DatasetAttr) -> dict:
    """OpenAI chat messages: assistant `tool_calls` become function turns, consecutive tool results one observation."""
    import json

    col, tag = attr.columns, attr.tags
    role_of = _role_map(tag)
    messages = example.get(col["messages"]) or []
    system = example.get(col["system"], "") if col.get("system") else ""
    if messages and isinstance(messages[0], dict) and messages[0].get(tag["role_tag"]) == tag["system_tag"]:
        system, messages = messages[0].get(tag["content_tag"], ""), messages[1:]
    aligned, pending = [], []
    for message in messages:
        role, content = message.get(tag["role_tag"]), message.get(tag["content_tag"])
        if role in (tag["assistant_tag"], tag["function_tag"]) and message.get("tool_calls"):
            content = json.dumps([call["function"] for call in message["tool_calls"]], ensure_ascii=False)
            role = tag["function_tag"]
        if role == tag["observation_tag"]:
            pending.append(content)
            continue
        if pending:
            aligned.append(_msg(OBSERVATION, "\n</tool_response>\n<tool_response>\n".join(pending)))
            pending = []
        if role not in role_of:
            return _aligned([], [], "", "")
        aligned.append(_msg(role_of[role], content))
    broken = any(
        m["role"] not in ((USER, OBSERVATION) if i % 2 == 0 else (ASSISTANT, FUNCTION)) for i, m in enumerate(aligned)
    )
    tools = example.get(col["tools"], "") if col.get("tools") else ""
    if isinstance(tools, (dict, list)):
        tools = json.dumps(tools, ensure_ascii=False)
    system = _openai_system(system, tools)
    return _finish(
        example,
        attr,
        aligned,
        system,
        broken,
        even_roles=(tag["assistant_tag"], tag["function_tag"]),
        role_of=role_of,
        tools=tools,
    )


def _openai_system(system: str, tools: str) -> str:
    """LLaMA-Factory 0.9.5 rewrites the system prompt of openai-format data (a Nemotron convention); we do the same
    so the same data trains on the same tokens: no system and no tools → "detailed thinking off"; a system
    without tools gains "\ndetailed thinking off" (unless it already says on/off); with tools, "\n"."""
    off = "detailed thinking off"
    if not system:
        return system if tools else off
    if tools:
        return system + "\n"
    return system if ("detailed thinking on" in system or off in system) else system + "\n" + off


def _finish(example, attr, aligned, system, broken, even_roles, role_of, tools=None) -> dict:
    """Split aligned turns into prompt/response for sft, ranking (chosen/rejected) or kto data."""
    col, tag = attr.columns, attr.tags
    if (not attr.ranking and len(aligned) % 2 != 0) or (attr.ranking and len(aligned) % 2 == 0):
        broken = True
    prompt, response = aligned[:-1], aligned[-1:]
    if broken:
        pass
    elif col.get("kto_tag"):
        kto_tag = example.get(col["kto_tag"])
        broken = not isinstance(kto_tag, bool) or not response[0]["content"]
        response = [] if broken else _kto_response(response[0], kto_tag)
    elif attr.ranking:
        pair = []
        for item in (example.get(col.get("chosen")), example.get(col.get("rejected"))):
            if isinstance(item, dict) and item.get(tag["role_tag"]) in even_roles and item.get(tag["content_tag"]):
                pair.append(_msg(role_of[item[tag["role_tag"]]], item[tag["content_tag"]]))
        broken = len(pair) != 2
        prompt, response = aligned, pair
    elif not response[0]["content"]:
        broken = True
    if broken:
        prompt, response = [], []
    if tools is None:
        tools = example.get(col["tools"], "") if col.get("tools") else ""
    return _aligned(prompt, response, system, tools)


def _aligned(prompt: list, response: list, system, tools) -> dict:
    return {
        "_prompt": prompt,
        "_response": response,
        "_system": system if isinstance(system, str) else "",
        "_tools": tools if isinstance(tools, str) else "",
    }


CONVERTERS = {"alpaca": convert_alpaca, "sharegpt": convert_sharegpt, "openai": convert_openai}


def convert(example: dict, attr: DatasetAttr) -> dict:
    return CONVERTERS[attr.formatting](example, attr)
