"""The README's end-to-end path (register a dataset, train LoRA DPO, chat, serve and call with openai, export)
runs as written, and each step did its job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lf_dist.ports import free_port

from .conftest import ROOT


def _block(marker: str = "<!-- seeds-path -->") -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split(marker, 1)[1]
    return after.split("```bash\n", 1)[1].split("\n```\n", 1)[0]


def _run_as_written(tmp_path: Path, marker: str, typed: str) -> tuple[str, str]:
    """Run a README block in bash from an empty folder (with the repository's examples/), `typed` on its stdin as
    a person types into the chat; returns its stdout and stderr."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "block.sh").write_text("set -e\n" + _block(marker) + "\n", encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "API_PORT": str(free_port()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        ["bash", "block.sh"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(typed, timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    return out, err


def test_the_readme_path_from_dataset_to_served_and_exported_model_runs(tmp_path):
    out, _ = _run_as_written(
        tmp_path, "<!-- seeds-path -->", "Write the word in capital letters.\nriver\nclear\nexit\n"
    )

    log = [json.loads(x) for x in (tmp_path / "saves/my_dpo/trainer_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 8 and steps[-1]["loss"] < steps[0]["loss"]  # 8 pairs × 4 epochs / batch 4; DPO learns
    assert out.count("Assistant: ") == 2 and "History has been removed." in out
    assert "CompletionUsage(completion_tokens=" in out  # the openai client's answer, with usage
    merged = tmp_path / "saves/my_dpo_merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    assert "adapter_config.json" not in os.listdir(merged)
    assert "<|im_start|>" in (merged / "chat_template.jinja").read_text(encoding="utf-8")


def test_the_quick_start_trains_chats_and_serves_as_written(tmp_path):
    out, err = _run_as_written(tmp_path, "<!-- quick-start -->", "Give three tips for staying healthy.\nexit\n")
    adapter = tmp_path / "saves" / "tiny" / "lora" / "sft"
    assert (adapter / "adapter_model.safetensors").is_file()
    results = json.loads((adapter / "all_results.json").read_text(encoding="utf-8"))
    log = [json.loads(x) for x in (adapter / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] and results["eval_loss"] < 6  # it learned (its first steps: a loss of ~8)
    assert out.count("Assistant: ") == 1  # the chat answered once, then `exit`
    answer = out.rsplit("\n", 2)[-2] if out.endswith("\n") else out.rsplit("\n", 1)[-1]
    assert answer.strip() and "Traceback" not in err  # the openai client's answer, printed last
    assert "POST /v1/chat/completions 200" in err  # the server's access log


def test_the_readme_lists_every_llamafactory_option_as_the_code_treats_it():
    from lf_dist.config.options import markdown_table

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- lf-options:start -->\n", "<!-- lf-options:end -->"
    shown = text[text.index(start) + len(start) : text.index(end)]
    assert shown.strip() == markdown_table().strip(), "regenerate with python -m lf_dist.config.options"
