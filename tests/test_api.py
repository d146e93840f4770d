"""`lf-dist api` as a client sees it: the real `openai` client against a live server on 127.0.0.1.

One server (module fixture) serves the tiny model with a trained adapter, an API key, one generation at a time
and 19 waiting; the answers are compared with the engine in this process (greedy decoding, same weights).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from lf_dist.cli import main
from lf_dist.run_checks import load_config

from . import api_server
from .conftest import TINY_MODEL, base_overrides

KEY = "sk-test-lf-dist"
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    (root / "empty.yaml").write_text("{}\n", encoding="utf-8")
    assert main(["train", str(root / "empty.yaml"), *base_overrides(root / "lora", max_steps=4)]) == 0
    cfg = root / "infer.yaml"
    cfg.write_text(
        f"model_name_or_path: {TINY_MODEL}\nadapter_name_or_path: {root / 'lora'}\ntemplate: chatml\n"
        "max_new_tokens: 32\n",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture(scope="module")
def server(setup):
    # API_HOST unset: the default, this machine only
    proc, base = api_server.start(setup, env={"API_KEY": KEY, "API_MODEL_NAME": NAME, "API_MAX_QUEUE": "19"})
    yield base
    api_server.stop(proc)


@pytest.fixture(scope="module")
def engine(setup):
    from lf_dist.serve.engine import ChatEngine

    return ChatEngine(load_config(setup, command="api"))


def client(base: str, key: str = KEY, retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=retries, timeout=120)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _expected(engine, max_new_tokens=32):
    s = engine.default_sampling()
    s.do_sample, s.max_new_tokens = False, max_new_tokens
    return engine.chat(MESSAGES[1:], s, system="Be brief."), engine.encode(MESSAGES[1:], "Be brief.")


def test_models_lists_the_served_name(server):
    assert [m.id for m in client(server).models.list().data] == [NAME]


def test_chat_completion_matches_the_engine_with_usage_counts(server, engine):
    expected, prompt = _expected(engine)
    r = client(server).chat.completions.create(model=NAME, messages=MESSAGES, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    # the prompt is the training template's, token for token
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == expected.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_sends_the_same_answer_in_pieces(server, engine):
    expected, prompt = _expected(engine, 16)
    stream = client(server).chat.completions.create(
        model=NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_max_tokens_and_stop_end_the_answer(server, engine):
    c = client(server)
    r = c.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=3)
    assert r.usage.completion_tokens <= 3
    if r.usage.completion_tokens == 3:
        assert r.choices[0].finish_reason == "length"
    full = _expected(engine)[0].text
    word = full.split()[len(full.split()) // 2]
    r = c.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop" and word not in r.choices[0].message.content
    assert full.startswith(r.choices[0].message.content)


def test_a_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError) as err:
        client(server, key="wrong").chat.completions.create(model=NAME, messages=MESSAGES)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_health_answers_without_the_key(server):
    r = httpx.get(f"{server}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": NAME}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": NAME, "messages": []}, "messages"),
        ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"model": NAME, "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": NAME, "messages": MESSAGES, "max_tokens": 10**7}, "max_tokens"),
        ({"model": NAME, "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": NAME, "messages": MESSAGES, "n": 2}, "n"),
        ({"model": NAME, "messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
        ({"model": NAME, "messages": "hello"}, "messages"),
        ({"messages": MESSAGES}, "model"),
    ],
)
def test_malformed_requests_get_a_400_in_openai_shape(server, body, fragment):
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"] + str(error["param"])


def test_a_body_that_is_not_json_is_400_and_an_unknown_path_404(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/nothing", headers=auth).json()["error"]["type"] == "not_found_error"


def test_any_model_name_is_answered_under_that_name(server, engine):
    expected, _ = _expected(engine, 8)
    r = client(server).chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0, max_tokens=8)
    assert r.model == "gpt-4o" and r.choices[0].message.content == expected.text


def test_twenty_parallel_requests_all_complete(server, engine):
    expected = _expected(engine, 8)[0].text
    c = client(server, retries=0)

    def ask(_):
        r = c.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=8)
        return r.choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert answers == [expected] * 20


def test_past_the_queue_requests_get_429_and_the_server_keeps_serving(server):
    c = client(server, retries=0)

    def ask(_):
        try:
            c.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=32)
            return 200
        except openai.RateLimitError as err:
            assert err.body["code"] == "rate_limit_exceeded"
            return 429

    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(ask, range(40)))
    assert codes.count(200) >= 20 and codes.count(429) >= 1 and set(codes) == {200, 429}
    assert ask(0) == 200


def test_the_server_listens_on_localhost_only_by_default(server):
    host_ip = _outward_ip()
    if host_ip is None:
        pytest.skip("this machine has no address besides loopback")
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{host_ip}:{port}/v1/models", timeout=3)


def _outward_ip() -> str | None:
    """This machine's address on its network interface (a UDP connect sends nothing, it only picks a route)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


def test_api_settings_from_the_environment_are_checked(setup):
    env = {**os.environ, "API_PORT": "eighty"}
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "api", str(setup)],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert proc.returncode == 2 and "API_PORT: expected a whole number" in proc.stderr
    assert Path(setup).is_file()
