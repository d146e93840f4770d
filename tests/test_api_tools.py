"""Tool calling through `lf-dist api`, as LLaMA-Factory's API does it: the tools shown in the template's tool format,
a call in the answer read back into OpenAI's `tool_calls`, the call and the tool's result in the history rendered as
the function and observation turns the model was trained on.

The tiny model is trained (module fixture, the real `lf-dist train`) on examples/data/tool_demo.json with the qwen
template, then served by a real `lf-dist api` and called with the `openai` client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from lf_dist.data.converters import convert_sharegpt
from lf_dist.data.registry import get_dataset_attrs
from lf_dist.data.templates import fix_tokenizer, get_template
from lf_dist.data.tokenize import encode_prompt, encode_turns
from lf_dist.data.tool_formats import TOOL_FORMATS, extract_calls, format_calls
from lf_dist.serve.protocol import Message, split_messages

from . import api_server
from .conftest import DATA_DIR, TINY_MODEL

ROWS = json.loads((DATA_DIR / "tool_demo.json").read_text(encoding="utf-8"))
TOOLS = [{"type": "function", "function": f} for f in json.loads(ROWS[0]["tools"])]
WEATHER = [{"role": "user", "content": "What is the weather like in Lunport?"}]

CALLS = [("get_weather", '{"city": "Lunport"}'), ("get_time", '{"city": "Kestrel", "utc": true}')]


@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
def test_each_tool_format_reads_back_the_calls_it_renders(fmt):
    calls = CALLS[:1] if fmt == "glm4" else CALLS  # GLM-4 has no parallel calls
    assert extract_calls(fmt, format_calls(fmt, calls)) == calls
    assert extract_calls(fmt, format_calls(fmt, calls[:1])) == calls[:1]


@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Lunport.",
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "get_weather"}\n</tool_call>',
        'Action: get_weather\nAction Input: {"city": ',
        '{"name": "get_weather"}',
        '[{"city": "Lunport"}]',
    ],
)
def test_text_that_is_not_a_valid_call_comes_back_as_it_is(fmt, text):
    assert extract_calls(fmt, text) == text


def _openai_messages(row: dict) -> list[dict]:
    """A sharegpt row of tool_demo as an OpenAI client sends the same conversation."""
    out = []
    for turn in row["conversations"]:
        if turn["from"] == "human":
            out.append({"role": "user", "content": turn["value"]})
        elif turn["from"] == "gpt":
            out.append({"role": "assistant", "content": turn["value"]})
        elif turn["from"] == "function_call":
            call = json.loads(turn["value"])
            function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
            out.append({"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "function": function}]})
        else:
            out.append({"role": "tool", "tool_call_id": "call_0", "content": turn["value"]})
    return out


def test_a_tool_conversation_from_a_client_renders_as_training_renders_it():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = get_template("qwen", tok)
    fix_tokenizer(template, tok)
    attr = get_dataset_attrs("tool_demo", DATA_DIR)[0]
    row = next(r for r in ROWS if [t["from"] for t in r["conversations"]][-2:] == ["observation", "gpt"])
    aligned = convert_sharegpt(row, attr)
    pairs = encode_turns(template, tok, [aligned["_prompt"]], [aligned["_response"]], [None], [aligned["_tools"]])[0]
    trained = [i for source, target in pairs[:-1] for i in source + target] + pairs[-1][0]

    system, turns = split_messages([Message(**m) for m in _openai_messages(row)[:-1]])
    tools = json.dumps([t["function"] for t in TOOLS])
    assert encode_prompt(template, tok, turns, system, tools) == trained


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    train = root / "train.yaml"
    train.write_text(
        f"model_name_or_path: {TINY_MODEL}\nstage: sft\nfinetuning_type: full\ndataset: tool_demo\n"
        f"dataset_dir: {DATA_DIR}\ntemplate: qwen\ncutoff_len: 560\noutput_dir: {root / 'model'}\n"
        "per_device_train_batch_size: 4\nlearning_rate: 5.0e-3\nnum_train_epochs: 12\nlogging_steps: 16\n"
        "save_strategy: 'no'\nreport_to: none\ndisable_tqdm: true\n",
        encoding="utf-8",
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(train)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    infer = root / "infer.yaml"
    infer.write_text(f"model_name_or_path: {root / 'model'}\ntemplate: qwen\nmax_new_tokens: 64\n", encoding="utf-8")
    proc, base = api_server.start(infer)
    yield base
    api_server.stop(proc)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(api_key="0", base_url=f"{base}/v1", max_retries=0, timeout=120)


@pytest.mark.slow
def test_a_model_trained_on_tool_calls_calls_the_tool_and_answers_its_result(server):
    client = _client(server)
    result = client.chat.completions.create(model="tiny-tools", messages=WEATHER, tools=TOOLS, temperature=0)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > len("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Lunport"}

    messages = [
        *WEATHER,
        choice.message,  # handed back as the client got it
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"condition": "sunny", "temperature": 21})},
    ]
    answer = client.chat.completions.create(model="tiny-tools", messages=messages, tools=TOOLS, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens > result.usage.prompt_tokens + result.usage.completion_tokens


@pytest.mark.slow
def test_a_streamed_answer_with_tools_arrives_as_tool_calls(server):
    chunks = list(
        _client(server).chat.completions.create(
            model="tiny-tools",
            messages=[{"role": "user", "content": "What time is it in Kestrel?"}],
            tools=TOOLS,
            temperature=0,
            stream=True,
        )
    )
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_time", {"city": "Kestrel"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_tool_choice_none_neither_shows_the_tools_nor_reads_calls(server):
    client = _client(server)
    with_tools = client.chat.completions.create(model="m", messages=WEATHER, tools=TOOLS, max_tokens=4)
    without = client.chat.completions.create(model="m", messages=WEATHER, max_tokens=4)
    none = client.chat.completions.create(model="m", messages=WEATHER, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert none.usage.prompt_tokens == without.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "param"),
    [
        (lambda m, t: m[1]["tool_calls"][0]["function"].update(arguments="{city: Lunport"), "arguments"),
        (lambda m, t: t[0]["function"].pop("name"), "tools"),
        (lambda m, t: t[0].update(type="retrieval"), "tools"),
    ],
)
def test_malformed_tool_calls_and_tools_are_a_400_naming_them(server, change, param):
    call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}
    messages = [*WEATHER, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "{}"}]
    tools = json.loads(json.dumps(TOOLS))
    change(messages, tools)
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "m", "messages": messages, "tools": tools})
    assert r.status_code == 400 and param in str(r.json()["error"]["param"]), r.text
