"""Config loading: LLaMA-Factory names and defaults, overrides, and one-line errors for user mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lf_dist.cli import main
from lf_dist.errors import UserError
from lf_dist.run_checks import load_config

from .conftest import DATA_DIR, ROOT, TINY_MODEL, base_overrides

MIN = [f"model_name_or_path={TINY_MODEL}", "dataset=alpaca_demo", "output_dir=out"]


def test_llamafactory_defaults_are_applied():
    cfg = load_config(None, MIN)
    assert cfg.finetuning.stage == "sft" and cfg.finetuning.finetuning_type == "lora"
    assert cfg.finetuning.lora_rank == 8 and cfg.finetuning.lora_alpha == 16  # alpha = 2 x rank when unset
    assert cfg.finetuning.lora_target == "all" and cfg.data.cutoff_len == 2048
    assert cfg.finetuning.disable_gradient_checkpointing is False
    assert cfg.data.template is None  # the tokenizer's chat_template is used
    assert load_config(None, MIN + ["lora_rank=4"]).finetuning.lora_alpha == 8


def test_overrides_are_yaml_typed_and_win_over_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"model_name_or_path: {TINY_MODEL}\ndataset: a\noutput_dir: o\nlearning_rate: 1.0e-4\n", encoding="utf-8"
    )
    cfg = load_config(path, ["learning_rate=5e-4", "max_steps=30", "bf16=true", "lora_target=q_proj,v_proj"])
    assert cfg.train.learning_rate == 5e-4 and cfg.train.max_steps == 30 and cfg.train.bf16 is True
    assert cfg.finetuning.lora_target == "q_proj,v_proj"


def test_json_config_is_read(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(
        f'{{"model_name_or_path": "{TINY_MODEL}", "dataset": "a", "output_dir": "o", "cutoff_len": 64}}',
        encoding="utf-8",
    )
    assert load_config(path).data.cutoff_len == 64


def test_training_arguments_without_effect_are_reported_not_rejected():
    cfg = load_config(
        None,
        MIN
        + [
            "logging_dir=x",
            "include_num_input_tokens_seen=true",
            "optim=adafactor",  # adamw_8bit is implemented now (bitsandbytes)
            "logging_nan_inf_filter=false",  # torch_compile is implemented now
            "save_safetensors=true",
            "max_new_tokens=32",
        ],
    )
    assert {"logging_dir", "logging_nan_inf_filter", "optim", "max_new_tokens"} <= set(cfg.ignored)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora_rnak=4", "unknown key 'lora_rnak'; did you mean 'lora_rank'?"),
        ("learning_rat=1e-4", "did you mean 'learning_rate'?"),
        ("use_unsloth=true", "'use_unsloth' is a LLaMA-Factory option that lf-dist does not implement"),
        ("cutoff_len=0", "cutoff_len: must be > 0"),
        ("stage=foo", "stage: 'foo' is not one of"),
        ("finetuning_type=qlora", "finetuning_type: 'qlora' is not one of"),
        ("learning_rate=fast", "learning_rate: expected float"),
        ("lr_scheduler_type=warmup", "lr_scheduler_type:"),
        ("pref_loss=sigmod", "pref_loss: 'sigmod' is not one of sigmoid, hinge, ipo, orpo, simpo"),
        ("pref_loss=kto_pair", "pref_loss: 'kto_pair' is not implemented by lf-dist"),
        ("dpo_label_smoothing=0.7", "dpo_label_smoothing: must be in [0, 0.5)"),
        ("pref_beta=0", "pref_beta: must be > 0"),
        ("ref_model=/nonexistent", "ref_model: /nonexistent is not a Hugging Face checkpoint folder"),
        ("ref_model_adapters=x", "'ref_model_adapters' is a LLaMA-Factory option that lf-dist does not implement"),
    ],
)
def test_user_mistakes_raise_one_line_errors(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, MIN + [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def _run_cli(tmp_path, capsys, *extra, **overrides):
    out = tmp_path / "out"
    code = main(["train", str(ROOT / "examples/tiny/sft_lora.yaml"), *base_overrides(out, **overrides), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model_name_or_path": "/nonexistent/model"},
            "model_name_or_path: '/nonexistent/model' is not a folder, nor a hub model name",
        ),
        ({"dataset": "alpaca_dmo"}, "dataset 'alpaca_dmo' is not in"),
        ({"template": "chatmlx"}, "template: unknown template 'chatmlx'; did you mean 'chatml'?"),
        ({"flash_attn": "fa2"}, "flash_attn: fa2 needs the flash-attn package"),
    ],
)
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, overrides, message):
    code, err, out = _run_cli(tmp_path, capsys, **overrides)
    assert code == 2
    assert err[-1].startswith("lf-dist: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not out.exists()


def test_broken_dataset_file_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text('{"broken": {"file_name": "broken.json"}}', encoding="utf-8")
    (data / "broken.json").write_text(
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": 1}\n]', encoding="utf-8"
    )
    code, err, out = _run_cli(tmp_path, capsys, dataset="broken", dataset_dir=str(data))
    assert code == 2 and "broken.json: not valid JSON (line 3" in err[-1], err
    assert not out.exists()


def test_missing_config_file_and_bad_override_shape(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", str(ROOT / "examples/tiny/sft_lora.yaml"), "cutoff_len"]) == 2
    assert "not of the form key=value" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lf_dist",
            "train",
            str(ROOT / "examples/tiny/sft_lora.yaml"),
            "lora_rnak=4",
            f"output_dir={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lf-dist: error: unknown key 'lora_rnak'; did you mean 'lora_rank'?"


def test_non_empty_output_dir_without_overwrite_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("x", encoding="utf-8")
    code, err, _ = _run_cli(tmp_path, capsys, overwrite_output_dir="false")
    assert code == 2 and "already exists and is not empty" in err[-1]
    assert sorted(p.name for p in out.iterdir()) == ["something.txt"]


def test_demo_data_dir_exists():
    assert (DATA_DIR / "dataset_info.json").is_file()


def test_unchanged_llamafactory_config_loads_and_trains(tmp_path, capsys):
    """A LLaMA-Factory example config, as users have it, runs; only key without effect is named once."""
    cfg = load_config(ROOT / "tests/fixtures/llamafactory_lora_sft.yaml")
    assert cfg.train.data_seed == 7 and cfg.train.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert set(cfg.ignored) == {"logging_dir"}
    code = main(
        [
            "train",
            str(ROOT / "tests/fixtures/llamafactory_lora_sft.yaml"),
            f"model_name_or_path={TINY_MODEL}",
            f"dataset_dir={DATA_DIR}",
            f"output_dir={tmp_path / 'o'}",
            "max_steps=2",
            "max_samples=40",
            "disable_tqdm=true",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "notice: these keys have no effect in lf-dist: logging_dir" in err
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_report_to_names_implemented_installed_trackers_or_fails_in_one_line(monkeypatch):
    assert load_config(None, MIN + ["report_to=none"]).train.report_to == []
    assert load_config(None, MIN + ["report_to=tensorboard,wandb"]).train.report_to == ["tensorboard", "wandb"]
    assert load_config(None, MIN + ["report_to=[mlflow]"]).train.report_to == ["mlflow"]
    with pytest.raises(UserError, match="'comet_ml' is not a tracker lf-dist implements"):
        load_config(None, MIN + ["report_to=comet_ml"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"report_to: wandb is not installed \(pip install 'lf-dist\[wandb\]'\)"):
        load_config(None, MIN + ["report_to=wandb"])
    assert "wandb" not in load_config(None, MIN + ["report_to=all"]).train.report_to


def test_the_written_out_training_arguments_cover_the_installed_transformers():
    from lf_dist.config.known_keys import HF_TRAINING_ARGS, installed_hf_training_args

    missing = installed_hf_training_args() - HF_TRAINING_ARGS
    assert not missing, f"add to _HF5_TRAINING_ARGS in lf_dist/config/known_keys.py: {sorted(missing)}"


def test_reading_a_config_imports_no_trainer_stack():
    """Start-up: `lf-dist train` reads and checks its config before any heavy library loads."""
    import subprocess
    import sys

    probe = (
        "import sys; from lf_dist.run_checks import load_config; "
        f"load_config(None, {MIN!r} + ['logging_dir=x']); "
        "heavy = ('transformers.training_args', 'peft', 'bitsandbytes', 'deepspeed'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, encoding="utf-8", check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-1000:]
