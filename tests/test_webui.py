"""The web UI's routes and files without a browser (tests/test_webui_browser.py clicks through the page): the form
is the CLI's YAML, the plan is `lf-dist plan`'s, the preview is the training encoding, runs read their state,
mistakes are one line with nothing written, and the server binds loopback unless asked."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lf_dist.cli import main
from lf_dist.config.loader import build_config, read_file
from lf_dist.errors import UserError
from lf_dist.launchers.lock import lock_path
from lf_dist.webui import forms, run_state, runs
from lf_dist.webui.tail import records_after

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny"
TRAIN_EXAMPLES = sorted(p for p in TINY.glob("*.yaml") if not p.name.startswith("infer"))


@pytest.fixture
def client(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from lf_dist.webui.app import create_webui_app

    monkeypatch.chdir(ROOT)  # the examples' relative paths, as a user starting `lf-dist webui` in the repository
    return TestClient(create_webui_app(tmp_path / "runs"))


def _form(tmp_path: Path, **changes) -> dict:
    form = forms.from_yaml(TINY / "sft_lora.yaml")
    form["output_dir"] = str(tmp_path / "runs" / "sft")
    return {**form, **changes}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("example", TRAIN_EXAMPLES, ids=lambda p: p.stem)
def test_a_yaml_loaded_into_the_form_is_written_back_as_the_same_config(example, tmp_path):
    form = forms.from_yaml(example)
    written = tmp_path / "back.yaml"
    written.write_text(forms.to_yaml(form), encoding="utf-8")
    assert read_file(written) == read_file(example)  # every key and value, the page's fields and the others
    assert build_config(read_file(written)).to_dict() == build_config(read_file(example)).to_dict()
    assert set(form) - {"extra"} <= set(forms.TRAIN_FIELDS)  # the Train page shows these; the rest rides in extra
    assert form["stage"] in forms.field_kinds()["stage"]["choices"]


def test_the_page_fields_come_from_the_config_schema_with_their_types_and_defaults():
    kinds = forms.field_kinds()
    assert set(kinds) == set(forms.FIELDS)
    assert kinds["learning_rate"] == {"kind": "float", "default": 5e-05}
    assert kinds["lora_rank"]["kind"] == "int" and kinds["bf16"]["kind"] == "bool"
    assert kinds["packing"] == {"kind": "bool", "default": None}  # unset: the stage decides (a 3-way choice)
    assert "ppo_custom" in kinds["stage"]["choices"] and "fsdp2" in kinds["strategy"]["choices"]


def _cli_plan(config: Path, env: dict, capsys, monkeypatch) -> tuple[list[str], dict]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["plan", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert main(["plan", str(config), "--json"]) == 0
    return lines, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_plan_on_the_page_is_what_lf_dist_plan_prints_for_that_many_ranks(
    ranks, client, tmp_path, capsys, monkeypatch
):
    form = _form(tmp_path, ranks=ranks, lora_rank=16)
    planned = client.post("/api/plan", json={"form": form}).json()
    config = tmp_path / "cfg.yaml"
    config.write_text(forms.to_yaml(form), encoding="utf-8")
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"} if ranks == 2 else {}
    lines, as_json = _cli_plan(config, env, capsys, monkeypatch)
    assert planned["lines"] == lines and planned["plan"] == as_json and planned["fits"]
    assert as_json["world_size"] == ranks and "most that fits with lora" in "\n".join(lines)
    shown = client.post("/api/config/yaml", json={"form": form}).json()
    assert shown["yaml"] == config.read_text(encoding="utf-8") and "lora_rank: 16" in shown["yaml"]
    assert shown["command"].endswith(f"lf-dist train {tmp_path / 'runs' / 'sft.train.yaml'}")
    assert shown["command"].startswith("FORCE_TORCHRUN=1 NPROC_PER_NODE=2 " if ranks == 2 else "lf-dist train")


def test_a_plan_that_does_not_fit_is_shown_and_its_launch_refused_with_nothing_written(client, tmp_path):
    form = _form(tmp_path, cutoff_len=2_000_000, per_device_train_batch_size=64, finetuning_type="full")
    planned = client.post("/api/plan", json={"form": form}).json()
    assert planned["fits"] is False and "(does NOT fit)" in planned["lines"][0]
    refused = client.post("/api/launch", json={"form": form})
    assert refused.status_code == 400 and refused.json()["error"].startswith("the plan does not fit")
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"model_name_or_path": "/no/such/model"}, "model_name_or_path: '/no/such/model' is not a folder"),
        ({"dataset_dir": "/no/such/folder"}, "/no/such/folder"),
        ({"dataset": "alpaca_demo,no_such_set"}, "dataset 'no_such_set' is not in"),
        ({"learning_rate": "fast"}, "learning_rate: expected float"),
        ({"lora_rnak": 8}, "the form has fields lf-dist does not know: lora_rnak"),
        ({"ranks": 0}, "ranks: expected a whole number >= 1"),
    ],
)
def test_a_bad_path_or_value_on_the_page_is_one_line_and_nothing_is_written(change, says, client, tmp_path):
    form = _form(tmp_path, **change)
    for route in ("/api/plan", "/api/launch", *(["/api/preview"] if "ranks" not in change else [])):
        answer = client.post(route, json={"form": form})
        assert answer.status_code == 400 and says in answer.json()["error"], (route, answer.json())
        assert "\n" not in answer.json()["error"]
    assert _files(tmp_path) == []


def test_paths_typed_into_the_page_are_checked_before_anything_is_written(client, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "taken").write_text("a file", encoding="utf-8")
    is_file = client.post("/api/launch", json={"form": _form(tmp_path, output_dir=str(tmp_path / "runs" / "taken"))})
    assert is_file.status_code == 400 and is_file.json()["error"].endswith("is a file, not a folder")
    missing = client.post("/api/config/load", json={"path": str(tmp_path / "none.yaml")})
    assert missing.status_code == 400 and missing.json()["error"].startswith("config file not found")
    merged = {"model_name_or_path": str(tmp_path / "none"), "export_dir": str(tmp_path / "runs" / "merged")}
    export = client.post("/api/export", json={"form": merged})
    assert export.status_code == 400 and export.json()["error"].startswith("model_name_or_path:")
    unnamed = client.post("/api/export", json={"form": {"model_name_or_path": "examples/tiny/model"}})
    assert unnamed.status_code == 400 and unnamed.json()["error"].startswith("export_dir: required")
    assert client.get("/api/datasets", params={"dataset_dir": str(tmp_path / "x")}).status_code == 400
    assert client.get("/static/..%2Fapp.py").status_code in (400, 404)
    assert _files(tmp_path) == ["runs", "runs/taken"]


def test_the_page_never_writes_its_yaml_over_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "sft"
    run_state.yaml_path(out).write_text("mine: true\n", encoding="utf-8")
    with pytest.raises(UserError, match="was not written by lf-dist webui"):
        runs.write_yaml(out, "stage: sft\n")
    assert run_state.yaml_path(out).read_text(encoding="utf-8") == "mine: true\n"
    run_state.yaml_path(out).unlink()
    runs.write_yaml(out, "stage: sft\n")
    assert runs.write_yaml(out, "stage: dpo\n").read_text(encoding="utf-8").endswith("stage: dpo\n")


def test_the_preview_is_the_text_training_encodes_and_the_part_it_trains_on(client, tmp_path):
    from lf_dist.data.converters import convert
    from lf_dist.data.loader import load_raw
    from lf_dist.data.registry import get_dataset_attrs
    from lf_dist.data.tokenize import IGNORE_INDEX, preprocess_supervised
    from lf_dist.serve.export import load_tokenizer_and_template

    shown = client.post("/api/preview", json={"form": _form(tmp_path)}).json()["records"]
    assert [r["dataset"] for r in shown] == ["alpaca_demo"] * 3 + ["sharegpt_demo"] * 3
    cfg = forms.checked(_form(tmp_path))
    tokenizer, template = load_tokenizer_and_template(cfg)
    for attr in get_dataset_attrs("alpaca_demo,sharegpt_demo", TINY.parent.parent / "examples" / "data"):
        raw = load_raw(attr)
        aligned = [convert(raw[i], attr) for i in range(3)]
        columns = {k: [a[k] for a in aligned] for k in ("_prompt", "_response", "_system", "_tools")}
        encoded = preprocess_supervised(columns, template, tokenizer, cfg.data.cutoff_len, False, False)
        for i, record in enumerate(r for r in shown if r["dataset"] == attr.name):
            ids, labels = encoded["input_ids"][i], encoded["labels"][i]
            assert record["prompt"] + record["answer"] == tokenizer.decode(ids) and record["tokens"] == len(ids)
            last = max(j for j, x in enumerate(labels) if x == IGNORE_INDEX) + 1  # the last turn's answer
            assert record["answer"] == tokenizer.decode(ids[last:])
    names = client.get("/api/datasets", params={"dataset_dir": "examples/data"}).json()["datasets"]
    assert {"name": "ranking_demo", "formatting": "sharegpt", "ranking": True, "source": "file"} in names


def _state_file(out: Path, **state) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    run_state.state_path(out).write_text(json.dumps({"config": "c.yaml", "started": "now", **state}), encoding="utf-8")


def test_the_runs_list_names_each_run_state_and_a_failure_by_its_one_line(tmp_path):
    root = tmp_path / "runs"
    (root / "cli_done").mkdir(parents=True)
    (root / "cli_done" / "trainer_log.jsonl").write_text("", encoding="utf-8")
    (root / "cli_done" / "all_results.json").write_text("{}", encoding="utf-8")
    _state_file(root / "finished", rc=0)
    _state_file(root / "stopped", rc=75)
    _state_file(root / "live", supervisor=os.getpid())  # alive, no exit code yet
    _state_file(root / "deep" / "er" / "failed", rc=2)
    run_state.log_path(root / "deep" / "er" / "failed").write_text(
        f"{run_state.ATTEMPT}1 ===\nlf-dist: preempted: an earlier attempt\n{run_state.ATTEMPT}2 ===\n"
        "loading\nlf-dist: error: dataset 'x' is not in data/dataset_info.json\nlast words\n",
        encoding="utf-8",
    )
    (root / "cli_live").mkdir()  # a shell's `lf-dist train` of a web UI run: it holds the output_dir lock
    _state_file(root / "cli_live", rc=75)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}
    lock_path(root / "cli_live").with_suffix(".owner").write_text(json.dumps(owner), encoding="utf-8")
    (root / "cli_done" / "checkpoint-5").mkdir()
    (root / "cli_done" / "checkpoint-5" / "trainer_log.jsonl").write_text("", encoding="utf-8")  # not a run
    found = {Path(r["output_dir"]).name: r for r in runs.runs_under(root)}
    assert {name: r["state"] for name, r in found.items()} == {
        "cli_done": "finished",
        "finished": "finished",
        "stopped": "preempted",
        "live": "running",
        "cli_live": "running",
        "failed": "failed",
    }
    assert found["failed"]["error"] == "lf-dist: error: dataset 'x' is not in data/dataset_info.json"
    yaml_before = sorted(root.rglob("*.yaml"))
    with pytest.raises(UserError, match="is running; stop it first"):
        runs.launch(root / "live", "stage: sft\n", {})
    assert sorted(root.rglob("*.yaml")) == yaml_before  # nothing written over a running run's config
    with pytest.raises(UserError, match="is not running"):
        runs.stop(root / "finished")


def test_the_log_follower_starts_over_when_a_resume_rewrites_the_log(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    log.write_text(
        "".join(json.dumps({"current_steps": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)), encoding="utf-8"
    )
    first = records_after(log, 0, None)
    assert not first["reset"] and first["count"] == 4
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"current_steps": 5}) + "\n" + '{"current_steps": 6, "lo')  # 6 is half-written
    assert records_after(log, 4, 4) == {"reset": False, "records": [{"current_steps": 5}], "count": 5}
    log.write_text("".join(json.dumps({"current_steps": s}) + "\n" for s in (1, 2, 3)), encoding="utf-8")  # resumed
    again = records_after(log, 5, 5)
    assert again["reset"] and [r["current_steps"] for r in again["records"]] == [1, 2, 3]
    log.write_text("".join(json.dumps({"current_steps": s}) + "\n" for s in (1, 2, 9, 10, 11)), encoding="utf-8")
    assert records_after(log, 3, 3)["reset"]  # as many records as before, but not the same ones
    log.write_text('{"current_steps": 1, "loss": NaN, "grad_norm": Infinity}\n', encoding="utf-8")  # fp16 overflow
    assert records_after(log, 0, None)["records"] == [{"current_steps": 1, "loss": None, "grad_norm": None}]


def test_the_chat_page_streams_the_answer_lf_dist_chat_gives_greedy(client, tmp_path):
    from lf_dist.run_checks import load_config
    from lf_dist.serve.chat import run_chat

    model = {"model_name_or_path": "examples/tiny/model", "template": "chatml", "trust_remote_code": True}
    assert client.post("/chat/v1/chat/completions", json={}).status_code == 409  # no model yet
    loaded = client.post("/api/chat/load", json={"form": model}).json()
    assert loaded["model"] == "model" and loaded["sampling"]["do_sample"] is True  # LLaMA-Factory's default
    request = {"model": "x", "messages": [{"role": "user", "content": "Reverse the letters of the word. tiger"}]}
    request.update(stream=True, do_sample=False, max_tokens=20)
    pieces = []
    with client.stream("POST", "/chat/v1/chat/completions", json=request) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
    config = tmp_path / "infer.yaml"
    config.write_text(forms.to_yaml({**model, "do_sample": False, "max_new_tokens": 20}), encoding="utf-8")
    out = io.StringIO()
    run_chat(
        load_config(config, command="chat"), stdin=io.StringIO(request["messages"][0]["content"] + "\n"), stdout=out
    )
    expected = out.getvalue().split("Assistant: ", 1)[1].split("\n\nUser: ", 1)[0]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == expected


def test_the_page_binds_this_machine_unless_asked_and_warns_for_another_host(monkeypatch, caplog):
    import uvicorn

    from lf_dist.webui import server

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    assert server._address(None, None) == ("127.0.0.1", 7860)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")
    assert server._address(None, None) == ("0.0.0.0", 7000) and server._address("::1", 1) == ("::1", 1)
    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: bound.append((host, port)))
    monkeypatch.setattr(server, "guard_hosts", lambda app, host: None)  # its own test below
    with caplog.at_level("INFO", logger="lf_dist"):
        server._serve(object(), "127.0.0.1", 7860, "page")
        assert "not loopback" not in caplog.text
        server._serve(object(), "0.0.0.0", 7000, "page")
    assert bound == [("127.0.0.1", 7860), ("0.0.0.0", 7000)] and "warning: host 0.0.0.0 is not loopback" in caplog.text
    monkeypatch.setenv("GRADIO_SERVER_PORT", "web")
    with pytest.raises(UserError, match="GRADIO_SERVER_PORT: expected a TCP port"):
        server._address(None, None)
    assert main(["webui", "--runs", __file__]) == 2  # a file is not a runs folder: one line, exit 2


def test_the_web_ui_is_an_optional_extra_imported_only_by_its_commands():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert sorted(extras["webui"]) == ["fastapi>=0.110", "uvicorn>=0.29"]
    code = (
        "import sys, lf_dist.cli, lf_dist.worker; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('fastapi', 'uvicorn', 'selenium') or m.startswith('lf_dist.webui')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_on_loopback_the_page_answers_only_requests_addressed_to_this_machine(tmp_path):
    from fastapi.testclient import TestClient

    from lf_dist.webui.app import create_webui_app
    from lf_dist.webui.server import guard_hosts

    app = create_webui_app(tmp_path)
    guard_hosts(app, "127.0.0.1")
    local = TestClient(app, base_url="http://127.0.0.1:7860")
    assert local.get("/api/info").status_code == 200
    assert local.get("/api/info", headers={"host": "localhost:7860"}).status_code == 200
    assert local.get("/api/info", headers={"host": "rebound.example:7860"}).status_code == 400  # DNS rebinding
    shared = create_webui_app(tmp_path)
    guard_hosts(shared, "0.0.0.0")  # asked for the network: any name reaches it (with the warning line)
    assert TestClient(shared, base_url="http://lab-box:7860").get("/api/info").status_code == 200
