"""A user's first day, as a new user meets it: each mistake is one line and exit 2 with nothing written, the
commands LLaMA-Factory users type answer, eval-only runs say what they did, and the console shows the Trainer's
metric lines and closing block."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA_DIR, ROOT, TINY_MODEL, base_overrides


def _lf_dist(*args: str, stdin: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """The console script, as a user runs it (HF_HUB_OFFLINE=1 as tests/conftest.py sets it)."""
    return subprocess.run(
        [sys.executable, "-m", "lf_dist", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        check=False,
    )


def _one_line(proc: subprocess.CompletedProcess, start: str) -> str:
    """The process ended in exactly one error line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lf-dist: ")]
    assert len(lines) == 1 and lines[0].startswith(start), proc.stderr[-2000:]
    return lines[0]


def _yaml(tmp_path: Path, name: str, **values) -> Path:
    path = tmp_path / f"{name}.yaml"
    lines = [o.replace("=", ": ", 1) for o in base_overrides(tmp_path / name, **values)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_model_folder_without_weights_is_one_line_in_train_and_chat(tmp_path):
    broken = tmp_path / "half_downloaded"
    shutil.copytree(TINY_MODEL, broken)
    (broken / "model.safetensors").unlink()  # config and tokenizer arrived, the weights did not
    proc = _lf_dist("train", str(_yaml(tmp_path, "out", model_name_or_path=broken)))
    line = _one_line(proc, "lf-dist: error: model_name_or_path: ")
    assert "no weights" in line and "download the model again" in line
    assert not (tmp_path / "out").exists()
    chat = tmp_path / "chat.yaml"
    chat.write_text(f"model_name_or_path: {broken}\ntemplate: chatml\n", encoding="utf-8")
    assert "no weights" in _one_line(_lf_dist("chat", str(chat), stdin="hello\n"), "lf-dist: error: ")


def test_a_sharded_model_with_a_missing_shard_is_one_line(tmp_path):
    from lf_dist.errors import UserError
    from lf_dist.model.loader import check_weights

    folder = tmp_path / "sharded"
    folder.mkdir()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="lacks 1 of the 2 weight files its index names"):
        check_weights(str(folder))


def test_dpo_on_a_dataset_without_ranking_says_what_to_add_to_dataset_info(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pairs = [{"instruction": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(8)]
    (data / "pairs.json").write_text(json.dumps(pairs), encoding="utf-8")
    entry = {"pairs": {"file_name": "pairs.json", "columns": {"prompt": "instruction"}}}  # "ranking" forgotten
    (data / "dataset_info.json").write_text(json.dumps(entry), encoding="utf-8")
    config = _yaml(tmp_path, "out", stage="dpo", dataset="pairs", dataset_dir=data)
    line = _one_line(_lf_dist("train", str(config)), "lf-dist: error: dataset 'pairs': stage dpo trains on pairs")
    assert '"ranking": true' in line and '"chosen"' in line
    assert not (tmp_path / "out").exists()
    line = _one_line(
        _lf_dist("train", str(config), "stage=sft", "dataset=ranking_demo", f"dataset_dir={DATA_DIR}"), ""
    )
    assert "is registered as pairwise" in line and "stage sft trains on single answers" in line


def test_do_predict_without_predict_with_generate_is_refused_in_one_line_instead_of_training(tmp_path):
    line = _one_line(
        _lf_dist("train", str(_yaml(tmp_path, "out", do_predict=True, val_size=8))), "lf-dist: error: do_predict: "
    )
    assert "predict_with_generate: true" in line
    assert not (tmp_path / "out").exists()


def test_an_eval_only_run_says_nothing_was_saved_and_merges_its_metrics(tmp_path):
    trained = _lf_dist("train", str(_yaml(tmp_path, "out", max_steps=4, val_size=16)))
    assert trained.returncode == 0, trained.stderr[-2000:]
    out = tmp_path / "out"
    before = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    weights = (out / "adapter_model.safetensors").read_bytes()
    proc = _lf_dist("train", str(_yaml(tmp_path, "out", do_train=False, val_size=16)), f"adapter_name_or_path={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model saved" not in proc.stderr and "nothing trained or saved" in proc.stderr
    after = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    assert after["train_loss"] == before["train_loss"]  # merged into the training's results, not replaced
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)  # the trained adapter, again
    assert json.loads((out / "eval_results.json").read_text(encoding="utf-8")) == {"eval_loss": after["eval_loss"]}
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert "***** eval metrics *****" in proc.stdout


def test_llamafactory_commands_name_what_lf_dist_offers_and_version_flag_works():
    assert "do_eval" in _one_line(_lf_dist("eval"), "lf-dist: error: lf-dist has no ")
    missing = _lf_dist("webchat")  # LLaMA-Factory's web commands are lf-dist's too; webchat needs its YAML
    assert missing.returncode == 2 and "the following arguments are required: config" in missing.stderr
    version = _lf_dist("--version")
    assert version.returncode == 0 and version.stdout.strip() == _lf_dist("version").stdout.strip()
    assert version.stdout.startswith("lf-dist ")


def test_plan_takes_key_value_overrides_after_its_options():
    config = ROOT / "examples" / "tiny" / "sft_lora.yaml"
    proc = _lf_dist("plan", str(config), "--profile", "a6000x1", "cutoff_len=4096", "--json", "lora_rank=16")
    assert proc.returncode == 0, proc.stderr
    plan, base = json.loads(proc.stdout), json.loads(_lf_dist("plan", str(config), "--json").stdout)
    assert plan["profile"] == "a6000x1" and plan["cutoff_len"] == 4096 and base["cutoff_len"] == 256
    assert plan["trainable_params"] == 2 * base["trainable_params"]  # lora_rank 16, not the file's 8
    wrong = _lf_dist("plan", str(config), "--profile", "a6000x1", "--bogus")
    assert wrong.returncode == 2 and "unrecognized arguments: --bogus" in wrong.stderr


def test_the_console_shows_a_metrics_line_per_logging_step_and_a_closing_block(tmp_path):
    config = _yaml(tmp_path, "out", max_steps=4, logging_steps=2, disable_tqdm=False, val_size=16)
    proc = _lf_dist("train", str(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{'loss': ")]
    assert len(lines) == 2  # steps 2 and 4
    first = eval(lines[0])  # noqa: S307 - the Trainer's dict line, as LLaMA-Factory shows it
    assert list(first)[:4] == ["loss", "grad_norm", "learning_rate", "epoch"]
    block = proc.stdout[proc.stdout.index("***** train metrics *****") :]
    for key in ("train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_loss"):
        assert f"  {key} " in block
    assert "***** eval metrics *****" in block and "eval_loss" in block
    results = json.loads((tmp_path / "out" / "all_results.json").read_text(encoding="utf-8"))
    assert f"{results['train_loss']:.4f}".rstrip("0") in block


def test_export_writes_a_left_padding_tokenizer_and_no_library_warnings(tmp_path):
    config = tmp_path / "export.yaml"
    config.write_text(
        f"model_name_or_path: {TINY_MODEL}\ntemplate: chatml\nexport_dir: {tmp_path / 'merged'}\n", encoding="utf-8"
    )
    proc = _lf_dist("export", str(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved["padding_side"] == "left"
    assert "WARNING" not in proc.stderr and "accelerator" not in proc.stderr  # DeepSpeed's guess on a CPU


def test_bitsandbytes_hub_kernel_lines_stay_off_the_terminal_offline():
    code = "from lf_dist.log import quiet_libraries; quiet_libraries(); import bitsandbytes"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0 and "kernels-community" not in proc.stderr, proc.stderr


def test_a_rank_ends_without_interpreter_teardown(tmp_path):
    """Extension libraries report "leaked" objects from their finalizers at interpreter teardown (nanobind's
    dozens of lines after every torchrun run); a rank ends as the console script does, after its exit handlers."""
    hook = tmp_path / "site"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "class _Finalizer:\n"
        "    def __del__(self, write=os.write):  # module globals may be gone by then\n"
        "        write(2, b'teardown: leaked 1 instance\\n')\n"
        "if os.environ.get('LOCAL_RANK') is not None:\n"
        "    sys.modules['_teardown_probe'] = type(sys)('_teardown_probe')\n"
        "    sys.modules['_teardown_probe'].probe = _Finalizer()\n",
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "FORCE_TORCHRUN": "1",
        "NPROC_PER_NODE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(_yaml(tmp_path, "out", max_steps=2))],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teardown: leaked" not in proc.stderr
