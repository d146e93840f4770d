"""After training: the generation prompt is the training prompt, export merges exactly, chat streams with history.

One LoRA run on the tiny model (module fixture) is exported, chatted with and compared against base + adapter.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lf_dist.cli import main
from lf_dist.data.jinja import jinja_template
from lf_dist.data.templates import TEMPLATES, fix_tokenizer, get_template
from lf_dist.data.tokenize import IGNORE_INDEX, build_supervised, encode_prompt, encode_turns
from lf_dist.run_checks import load_config

from .conftest import TINY_MODEL, base_overrides

CONVERSATION = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And a fruit?\nOnly one word."},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA adapter trained 6 steps (checkpoint-3 on the way), chatml template."""
    root = tmp_path_factory.mktemp("serve")
    (root / "empty.yaml").write_text("{}\n", encoding="utf-8")
    out = root / "lora"
    assert main(["train", str(root / "empty.yaml"), *base_overrides(out, max_steps=6, save_steps=3)]) == 0
    return out


def _infer_yaml(tmp_path: Path, **keys) -> Path:
    values = {"model_name_or_path": str(TINY_MODEL), "template": "chatml", "do_sample": False, **keys}
    path = tmp_path / "infer.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["default", "chatml", "qwen", "llama3", "llama2", "mistral", "gemma", "glm4"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_generation_prompt_is_the_training_prompt_token_for_token(name, system):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = get_template(name, tok)
    fix_tokenizer(template, tok)
    answer = [{"role": "assistant", "content": "Apple."}]
    pairs = encode_turns(template, tok, [CONVERSATION], [answer], [system], [None])[0]
    ids, labels = build_supervised(pairs, template, tok.eos_token_id, 4096, False, False)
    prompt = encode_prompt(template, tok, CONVERSATION, system)
    n = len(prompt)
    assert ids[:n] == prompt
    assert labels[n - 1] == IGNORE_INDEX and labels[n] != IGNORE_INDEX  # the answer starts right after


@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if t.kind != "reasoning"])
def test_saved_jinja_chat_template_renders_the_training_prompt(name):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = get_template(name, tok)
    fix_tokenizer(template, tok)
    tok.chat_template = jinja_template(template, tok)
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert rendered == tok.decode(encode_prompt(template, tok, CONVERSATION, system))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_merges_the_adapter_into_shards_with_tokenizer_and_template(trained, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    cfg = _infer_yaml(tmp_path, adapter_name_or_path=trained, export_dir=out, export_size=0.001)
    assert main(["export", str(cfg)]) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and all(s.stat().st_size <= 1_000_000 + 10_000 for s in shards)
    assert (out / "model.safetensors.index.json").is_file() and not list(tmp_path.glob(".merged.tmp"))

    ids = torch.randint(0, 1000, (2, 24))
    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), trained)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)  # the training template, as a jinja chat template
    template = get_template("chatml", tok)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == tok.decode(
        encode_prompt(template, tok, CONVERSATION)
    )
    assert tok.eos_token == "<|im_end|>"


def test_export_turns_a_checkpoint_into_weights_and_a_second_export_replaces_the_first(trained, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    ckpt = trained / "checkpoint-3"
    for _ in range(2):
        assert main(["export", str(_infer_yaml(tmp_path, adapter_name_or_path=ckpt, export_dir=out))]) == 0
    ids = torch.randint(0, 1000, (1, 16))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), ckpt)
    exported = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(exported, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"quantization_bit": 4}, "adapters cannot be merged into a quantized base"),
        ({"export_legacy_format": True}, "export_legacy_format: the installed transformers writes only safetensors"),
        ({"export_hub_model_id": "me/model"}, "export_hub_model_id: lf-dist does not upload"),
        ({"export_quantization_bit": 4}, "export_quantization_bit: GPTQ export is not implemented"),
        ({"export_device": "gpu"}, "export_device: 'gpu' is not one of cpu, auto"),
        ({"infer_backend": "vllm"}, "infer_backend: 'vllm' is not implemented by lf-dist"),
    ],
)
def test_export_refusals_are_one_line_and_write_nothing(trained, tmp_path, keys, message):
    out = tmp_path / "merged"
    cfg = _infer_yaml(tmp_path, adapter_name_or_path=trained, export_dir=out, **keys)
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "export", str(cfg)], capture_output=True, text=True, encoding="utf-8"
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lf-dist: error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_inference_configs_need_no_output_dir_and_name_training_keys_as_without_effect(tmp_path):
    cfg = load_config(_infer_yaml(tmp_path, learning_rate=0.1), command="chat")
    assert "learning_rate" in cfg.ignored and cfg.train.output_dir is None
    assert "temperature" in load_config(None, base_overrides(tmp_path / "o", temperature=0.5)).ignored
    with pytest.raises(Exception, match="export_dir: required"):
        load_config(_infer_yaml(tmp_path), command="export")


@pytest.fixture(scope="module")
def engine(trained, tmp_path_factory):
    from lf_dist.serve.engine import ChatEngine

    cfg = load_config(
        _infer_yaml(tmp_path_factory.mktemp("eng"), adapter_name_or_path=trained, max_new_tokens=24), command="chat"
    )
    return ChatEngine(cfg)


def test_engine_streams_the_greedy_answer_with_its_token_counts(engine):
    from lf_dist.serve.engine import Answer

    messages = CONVERSATION[:1]
    answer = Answer()
    pieces = list(engine.stream(messages, answer=answer))
    ids = engine.encode(messages)
    with torch.no_grad():
        out = engine.model.generate(
            torch.tensor([ids]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=engine.eos_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
    expected = engine.tokenizer.decode(out, skip_special_tokens=True)
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert answer.prompt_tokens == len(ids) and answer.completion_tokens == len(out)
    ended = out[-1] in engine.eos_ids
    assert answer.finish_reason == ("stop" if ended else "length")


def test_a_stop_string_ends_the_answer_before_it(engine):
    full = engine.chat(CONVERSATION[:1]).text.strip()
    word = full.split()[len(full.split()) // 2]
    sampling = engine.default_sampling()
    sampling.stop = [word]
    answer = engine.chat(CONVERSATION[:1], sampling)
    assert answer.finish_reason == "stop" and word not in answer.text
    assert full.startswith(answer.text.strip())


def _read_until(fd: int, marker: str, timeout: float = 60.0) -> str:
    text, end = "", time.time() + timeout
    while marker not in text:
        if time.time() > end:
            raise AssertionError(f"no {marker!r} in terminal output:\n{text}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                text += os.read(fd, 4096).decode("utf-8", errors="replace")
            except OSError:
                break
    return text


def test_terminal_chat_streams_keeps_history_and_understands_clear_and_exit(engine, trained, tmp_path):
    cfg = _infer_yaml(tmp_path, adapter_name_or_path=trained, max_new_tokens=24)
    first = engine.chat([{"role": "user", "content": "hello"}]).text
    second = engine.chat(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "tell me more"},
        ]
    ).text
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lf_dist", "chat", str(cfg)],
        stdin=follower,
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        close_fds=True,
    )
    os.close(follower)
    try:
        _read_until(leader, "User: ")
        transcript = []
        for line in ("hello", "tell me more", "clear", "hello"):
            os.write(leader, (line + "\n").encode())
            transcript.append(_read_until(leader, "User: "))
        os.write(leader, b"exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(leader)

    def reply(chunk: str) -> str:
        return chunk.split("Assistant: ", 1)[1].rsplit("User: ", 1)[0].replace("\r\n", "\n").strip()

    assert reply(transcript[0]) == first.strip()
    assert reply(transcript[1]) == second.strip() and second.strip() != first.strip()  # history was used
    assert "History has been removed." in transcript[2]
    assert reply(transcript[3]) == first.strip()  # a fresh conversation again


def test_the_generation_keys_of_the_config_reach_generate(engine, tmp_path, monkeypatch):
    keys = dict(temperature=0.3, top_p=0.5, top_k=7, repetition_penalty=1.3, max_new_tokens=5)
    cfg = load_config(_infer_yaml(tmp_path, do_sample=True, default_system="'Be terse.'", **keys), command="chat")
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        kwargs["streamer"].end()

    monkeypatch.setattr(engine, "cfg", cfg)
    monkeypatch.setattr(engine.model, "generate", fake_generate)
    list(engine.stream(CONVERSATION[:1]))
    assert seen["do_sample"] is True and {k: seen[k] for k in keys} == keys
    assert seen["input_ids"][0].tolist() == engine.encode(CONVERSATION[:1], "Be terse.")
    assert (
        seen["eos_token_id"] == engine.eos_ids
        and engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in seen["eos_token_id"]
    )
    sampling = engine.default_sampling()
    sampling.temperature = 0  # temperature 0 is greedy decoding
    list(engine.stream(CONVERSATION[:1], sampling))
    assert seen["do_sample"] is False and seen["temperature"] is None


def test_a_4bit_base_chats_with_its_adapter_kept_unmerged(tmp_path):
    from .conftest import make_llama

    base = make_llama(tmp_path / "base")
    (tmp_path / "empty.yaml").write_text("{}\n", encoding="utf-8")
    adapter = tmp_path / "lora"
    assert (
        main(["train", str(tmp_path / "empty.yaml"), *base_overrides(adapter, model_name_or_path=base, max_steps=2)])
        == 0
    )
    from lf_dist.serve.engine import ChatEngine

    cfg = _infer_yaml(
        tmp_path, model_name_or_path=base, adapter_name_or_path=adapter, quantization_bit=4, max_new_tokens=6
    )
    engine = ChatEngine(load_config(cfg, command="chat"))
    assert hasattr(engine.model, "peft_config") and getattr(engine.model, "is_loaded_in_4bit", False)
    answer = engine.chat(CONVERSATION[:1])
    assert answer.completion_tokens > 0 and answer.prompt_tokens == len(engine.encode(CONVERSATION[:1]))


@pytest.fixture(scope="module")
def short_context_cfg(tmp_path_factory) -> Path:
    """The tiny model with a 256-token context and max_new_tokens 64: a few turns fill it."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("short")
    model = Path(shutil.copytree(TINY_MODEL, root / "model"))
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}), encoding="utf-8")
    cfg = root / "chat.yaml"
    cfg.write_text(f"model_name_or_path: {model}\ntemplate: chatml\ndo_sample: false\nmax_new_tokens: 64\n", "utf-8")
    return cfg


def test_chat_drops_the_oldest_exchanges_that_no_longer_fit_and_refuses_a_message_too_long_alone(short_context_cfg):
    from lf_dist.serve.engine import ChatEngine

    engine = ChatEngine(load_config(short_context_cfg, command="chat"))
    words = "river stone cloud garden silver lantern meadow candle forest harbor ".split()
    queries = [
        "Tell me about rivers.",
        "And stones? " + " ".join(words * 2),
        "And clouds? " + " ".join(words * 2),
        "Read this: " + " ".join(words * 30),  # alone more than the context leaves for a prompt
        "And gardens?",
    ]
    # the rule, plainly: before each answer, drop the oldest exchanges until the prompt leaves room for 64 tokens
    history, expected = [], []  # (exchanges dropped, exchanges kept, reply) per message
    for query in queries:
        if len(engine.encode([{"role": "user", "content": query}])) + 64 > 256:
            expected.append(("too long", len(history) // 2, None))
            continue
        dropped = 0
        while len(engine.encode(history + [{"role": "user", "content": query}])) + 64 > 256:
            history, dropped = history[2:], dropped + 1
        reply = engine.chat(history + [{"role": "user", "content": query}]).text
        expected.append((dropped, len(history) // 2, reply))
        history += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
    # every case: nothing dropped, some dropped while some history stays, a message too long alone (history kept)
    assert [d for d, _, _ in expected[:2]] == [0, 0] and expected[3][:2] == (
        "too long",
        expected[4][1] + expected[4][0],
    )
    assert any(d not in (0, "too long") and kept > 0 for d, kept, _ in expected)

    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "chat", str(short_context_cfg)],
        input="\n".join([*queries, "exit"]) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = proc.stdout.split("\nUser: ")[1:-1]  # what followed each message (the last: `exit`)
    assert len(answers) == len(queries)
    for printed, (dropped, _, reply) in zip(answers, expected):
        if dropped == "too long":
            assert printed.startswith("This message is too long to answer: the prompt (") and printed.count("\n") == 1
            assert "the conversation is kept" in printed and "Assistant:" not in printed
            continue
        notice = f"(The oldest {dropped} exchange(s) were dropped to fit the model's context of 256 tokens.)\n"
        assert printed == (notice if dropped else "") + f"Assistant: {reply}\n"
