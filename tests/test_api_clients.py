"""`lf-dist api` as other programs and people use it: LLaMA-Factory users' client code verbatim, clients that go away,
fields the server does not honour, the access log, /health and --host / --port.

One server (module fixture) serves a random-weight Llama (it rarely ends an answer by itself, so a long answer is
long) without an API key; its stderr is kept to read the access log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from lf_dist.ports import free_port

from .api_server import stop, wait_healthy
from .conftest import make_llama

LONG = 1900  # max_tokens of answers that are meant to be cut short


def _start(cfg: Path, stderr: Path, args=(), **env) -> subprocess.Popen:
    full = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env}
    for name in ("API_KEY", "API_MODEL_NAME", "API_HOST"):
        if name not in env:
            full.pop(name, None)
    with stderr.open("w", encoding="utf-8") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "lf_dist", "api", str(cfg), *args], env=full, stdout=subprocess.DEVNULL, stderr=err
        )


@pytest.fixture(scope="module")
def infer_cfg(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clients")
    model = make_llama(root / "llama", hidden=256, layers=4, intermediate=512)
    cfg = root / "infer.yaml"
    cfg.write_text(f"model_name_or_path: {model}\ntemplate: chatml\nmax_new_tokens: 16\n", encoding="utf-8")
    return cfg


@pytest.fixture(scope="module")
def server(infer_cfg):
    port = free_port()
    log = infer_cfg.parent / "server.log"
    proc = _start(infer_cfg, log, API_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, lambda: log.read_text(encoding="utf-8"))
    yield base, port, log
    stop(proc)


class AccessLog:
    """The access-log lines the server writes from now on."""

    def __init__(self, path: Path):
        self.path, self.start = path, path.stat().st_size

    def lines(self, count: int, timeout: float = 60) -> list[str]:
        deadline = time.time() + timeout
        while True:
            with self.path.open(encoding="utf-8") as f:
                f.seek(self.start)
                found = [line for line in f.read().splitlines() if re.match(r"\[lf-dist\] \S+ [A-Z]+ /", line)]
            if len(found) >= count or time.time() > deadline:
                return found
            time.sleep(0.2)


def _tokens(line: str) -> tuple[int, int]:
    match = re.search(r"prompt_tokens=(\d+) completion_tokens=(\d+)", line)
    return int(match.group(1)), int(match.group(2))


def test_llamafactory_style_client_code_gets_an_answer_for_any_model_name(server):
    base, port, _ = server
    # LLaMA-Factory's README, verbatim but for the port (api_key="" is refused by the openai client itself)
    from openai import OpenAI

    client = OpenAI(api_key="0", base_url=f"http://localhost:{port}/v1")
    result = client.chat.completions.create(
        messages=[{"role": "user", "content": "hello"}], model="my_finetuned_model"
    )
    print(result.choices[0].message)

    assert result.model == "my_finetuned_model"
    assert result.choices[0].message.role == "assistant" and isinstance(result.choices[0].message.content, str)
    assert result.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["llama"]  # the served name: the model folder's


def test_a_client_that_closes_its_stream_cancels_the_generation_and_blocks_nobody(server):
    base, _, log = server
    access = AccessLog(log)
    client = openai.OpenAI(api_key="0", base_url=f"{base}/v1", max_retries=0)
    question = [{"role": "user", "content": "Tell me a very long story."}]
    stream = client.chat.completions.create(
        model="any", messages=question, max_tokens=LONG, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # one piece of text is enough: the reader goes away
    stream.close()

    # a generous limit, far below the minutes a held model would block for
    later = client.with_options(timeout=60).chat.completions.create(
        model="any", messages=question, max_tokens=4, temperature=0
    )
    assert later.choices[0].message.content is not None and later.usage.completion_tokens <= 4
    lines = access.lines(2)
    cancelled = [line for line in lines if "cancelled: the client went away" in line]
    assert len(cancelled) == 1, lines
    assert _tokens(cancelled[0])[1] < LONG // 4, cancelled[0]  # stopped soon after the client left


def test_a_client_that_gives_up_waiting_for_a_whole_answer_cancels_it(server):
    base, _, log = server
    access = AccessLog(log)
    body = {"model": "any", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": LONG, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    [line] = access.lines(1)
    assert " 200 " in line and "cancelled: the client went away" in line and _tokens(line)[1] < LONG, line


def test_every_request_gets_one_access_log_line_with_its_tokens(server):
    base, _, log = server
    access = AccessLog(log)
    client = openai.OpenAI(api_key="0", base_url=f"{base}/v1", max_retries=0)
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    client.models.list()
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=5, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=messages,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])
    lines = access.lines(5)
    assert len(lines) == 5, lines
    pattern = r"\[lf-dist\] 127\.0\.0\.1 (GET|POST) (/\S+) (\d{3}) \d+ ms"
    parsed = [re.match(pattern, line).groups() for line in lines]
    assert parsed == [
        ("GET", "/health", "200"),
        ("GET", "/v1/models", "200"),
        ("POST", "/v1/chat/completions", "200"),
        ("POST", "/v1/chat/completions", "200"),
        ("POST", "/v1/chat/completions", "400"),
    ]
    assert _tokens(lines[2]) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert _tokens(lines[3]) == (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)
    assert "tokens" not in lines[0] + lines[1] + lines[4]
    assert "INFO" not in log.read_text(encoding="utf-8")  # uvicorn's own access log is silent


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("logit_bias", {"42": 5}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 1.0),
        ("tool_choice", "required"),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("n", 2),
        ("best_of", 3),  # not an OpenAI chat field at all
    ],
)
def test_a_field_the_server_would_ignore_is_a_400_naming_it(server, field, value):
    client = openai.OpenAI(api_key="0", base_url=f"{server[0]}/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={field: value}
        )
    assert err.value.body["param"] == field and err.value.body["message"].startswith(f"{field}: ")


def test_no_op_values_and_bookkeeping_fields_are_accepted(server):
    client = openai.OpenAI(api_key="0", base_url=f"{server[0]}/v1", max_retries=0)
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        response_format={"type": "text"},
        tool_choice="none",
        user="someone",
        metadata={"team": "a"},
        store=False,
    )
    assert r.choices[0].message.content is not None


def test_a_seed_makes_sampled_answers_repeat(server):
    client = openai.OpenAI(api_key="0", base_url=f"{server[0]}/v1", max_retries=0)

    def ask(seed: int) -> str:
        messages = [{"role": "user", "content": "Say something."}]
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    first = ask(7)
    assert ask(7) == first and len({first, ask(8), ask(9)}) > 1


def test_an_over_long_prompt_is_a_400_streamed_or_not(server):
    client = openai.OpenAI(api_key="0", base_url=f"{server[0]}/v1", max_retries=0)
    messages = [{"role": "user", "content": "river " * 2100}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=messages, max_tokens=8, stream=stream)
        assert err.value.body["code"] == "context_length_exceeded"


def test_port_and_host_options_win_over_the_environment_and_a_network_host_is_warned_about(infer_cfg, server):
    port, env_port = free_port(), free_port()
    log = infer_cfg.parent / "network.log"
    proc = _start(infer_cfg, log, ("--host", "0.0.0.0", "--port", str(port)), API_PORT=str(env_port), API_KEY="sk-x")
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", lambda: log.read_text(encoding="utf-8"))  # /health needs no key
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{env_port}/health")
    finally:
        stop(proc)
    text = log.read_text(encoding="utf-8")
    assert f"on http://0.0.0.0:{port}/v1" in text
    assert "warning: host 0.0.0.0 is not loopback: the model is reachable from the network (callers need API_KEY)" in (
        text
    )
    assert "warning" not in server[2].read_text(encoding="utf-8")  # the loopback default: no warning


def test_a_bad_port_option_is_one_line(infer_cfg):
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "api", str(infer_cfg), "--port", "70000"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert proc.returncode == 2 and "--port: expected a TCP port from 1 to 65535, got 70000" in proc.stderr
