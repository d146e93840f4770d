"""Online RL as users run it: the tiny grpo, ppo_custom and ppo examples raise their rewards on a CPU in seconds,
LLaMA-Factory's own PPO YAML runs, the result loads in chat and export, a killed run resumes bitwise, and every
mistake ends in one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import DATA_DIR, ROOT, TINY_MODEL

EXAMPLES = ROOT / "examples" / "tiny"


def _run(command: str, config: Path, *overrides: str, cwd: Path = ROOT, env: dict | None = None, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "lf_dist", command, str(config), *overrides],
        cwd=cwd,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=400,
    )


def _train(config: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    proc = _run("train", config, "disable_tqdm=true", "logging_steps=1", *overrides, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _log(out: Path) -> list[dict]:
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if "loss" in e]


def assert_planned_within_20_percent(out: Path) -> None:
    """The measured peak (RSS on a CPU) within ±20% of the plan's estimate, which counts the rollout's terms."""
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    assert abs(results["peak_memory_gb"] / results["planned_peak_memory_gb"] - 1) <= 0.2, results


def _first_last(values: list[float]) -> tuple[float, float, float]:
    return statistics.mean(values[:5]), statistics.stdev(values[:5]), statistics.mean(values[-5:])


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """The reward model `examples/tiny/rm_lora.yaml` trains, as ppo_lora.yaml expects it."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    _train(EXAMPLES / "rm_lora.yaml", f"output_dir={out}")
    return out


@pytest.fixture(scope="module")
def ppo_custom_run(tmp_path_factory) -> Path:
    """ppo_custom as the fork runs it: no reward_funcs key, custom_rewards/reward_functions.py in the working
    directory."""
    work = tmp_path_factory.mktemp("fork")
    shutil.copytree(EXAMPLES / "custom_rewards", work / "custom_rewards")
    text = (EXAMPLES / "ppo_custom_lora.yaml").read_text(encoding="utf-8")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("reward_funcs:"))
    text = text.replace("examples/tiny/model", str(TINY_MODEL)).replace("examples/data", str(DATA_DIR))
    config = work / "ppo_custom_lora.yaml"
    config.write_text(text, encoding="utf-8")
    _train(config, f"output_dir={work / 'out'}", cwd=work)
    return work / "out"


def test_grpo_example_raises_the_reward_of_its_reward_function(tmp_path):
    out = tmp_path / "grpo"
    _train(EXAMPLES / "grpo_lora.yaml", f"output_dir={out}")
    log = _log(out)
    first, _, last = _first_last([e["reward"] for e in log])
    assert last - first >= 0.15, (first, last)
    assert all(math.isfinite(e["kl"]) for e in log) and log[0]["kl"] == 0.0  # the reference is the start
    for key in (
        "reward",
        "reward_std",
        "rewards/even_word_share/mean",
        "kl",
        "entropy",
        "policy_loss",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "frac_reward_zero_std",
        "lr",  # trainer_log.jsonl names it as LLaMA-Factory does
        "time/generating",
        "time/scoring",
        "time/updating",
    ):
        assert key in log[-1], key
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    assert results["generated_tokens_per_second"] > 0 and results["update_tokens_per_second"] > 0
    assert (out / "training_reward.png").is_file() and (out / "training_loss.png").is_file()
    assert_planned_within_20_percent(out)


def test_ppo_custom_with_the_forks_default_reward_file_raises_the_reward(ppo_custom_run):
    log = _log(ppo_custom_run)
    # the first log is the first 5 steps' mean over 160 samples: the base policy's rate, within about ±0.02
    first, last = log[0]["reward"], statistics.mean(e["reward"] for e in log[-5:])
    assert last - first >= 0.15, (first, last)
    assert all(math.isfinite(e["kl"]) for e in log)
    for key in ("value_loss", "kl_coef", "policy_loss", "clip_ratio/value_mean", "entropy"):
        assert key in log[-1], key
    assert_planned_within_20_percent(ppo_custom_run)


def test_the_value_head_is_saved_apart_and_the_policy_loads_in_chat_and_export(ppo_custom_run, tmp_path):
    head = load_file(ppo_custom_run / "value_head.safetensors")
    assert set(head) == {"v_head.summary.weight", "v_head.summary.bias"}
    assert not any("v_head" in k for k in load_file(ppo_custom_run / "adapter_model.safetensors"))
    infer = tmp_path / "infer.yaml"
    infer.write_text(
        f"model_name_or_path: {TINY_MODEL}\nadapter_name_or_path: {ppo_custom_run}\ntemplate: chatml\n"
        f"max_new_tokens: 8\nexport_dir: {tmp_path / 'merged'}\n",
        encoding="utf-8",
    )
    chat = _run("chat", infer, stdin="hello\nexit\n")
    assert chat.returncode == 0 and "Assistant:" in chat.stdout, chat.stderr[-2000:]
    export = _run("export", infer)
    assert export.returncode == 0, export.stderr[-2000:]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("v_head" in k or "lora" in k for k in merged)


def test_ppo_against_a_reward_model_trained_by_rm_raises_its_score(reward_model, tmp_path):
    out = tmp_path / "ppo"
    _train(EXAMPLES / "ppo_lora.yaml", f"reward_model={reward_model}", f"output_dir={out}")
    first, spread, last = _first_last([e["reward"] for e in _log(out)])
    assert last >= first + spread, (first, spread, last)
    assert_planned_within_20_percent(out)


def test_llamafactorys_own_ppo_yaml_runs_with_only_its_paths_changed(reward_model, tmp_path):
    """examples/train_lora/llama3_lora_ppo.yaml of LLaMA-Factory (top_k 0, top_p 0.9, 512 new tokens), pointed at
    the tiny model, the demo data and a reward model trained by rm_lora.yaml; two steps of its run."""
    out = tmp_path / "ppo"
    proc = _train(
        ROOT / "tests/fixtures/llamafactory_lora_ppo.yaml", f"reward_model={reward_model}", f"output_dir={out}",
        "max_steps=2", "max_new_tokens=24",
    )  # fmt: skip
    log = _log(out)
    assert len(log) == 2 and all(math.isfinite(e["reward"]) and math.isfinite(e["loss"]) for e in log)
    assert "Traceback" not in proc.stderr


def test_a_run_killed_after_its_second_checkpoint_resumes_to_the_same_weights(tmp_path):
    """ppo_custom carries its KL coefficient and score moments across the checkpoint; -9 leaves no chance to
    save anything else."""
    config = EXAMPLES / "ppo_custom_lora.yaml"
    common = ["max_steps=6", "save_steps=2", "per_device_train_batch_size=4", "overwrite_output_dir=false"]
    common += ["disable_tqdm=true", "logging_steps=1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    _train(config, f"output_dir={ref}", *common)
    killed = _run(
        "train", config, f"output_dir={out}", *common, env={"LF_DIST_KILL_AT_STEP": "5", "LF_DIST_KILL_RANK": "0"}
    )
    assert killed.returncode != 0 and (out / "checkpoint-4").is_dir()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text(encoding="utf-8"))
    assert set(state["stage_state"]) == {"kl", "moments"} and state["stage_state"]["moments"]["count"] > 1
    _train(config, f"output_dir={out}", *common)  # the same command resumes from checkpoint-4
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(load_file(out / "value_head.safetensors")["v_head.summary.weight"],
                       load_file(ref / "value_head.safetensors")["v_head.summary.weight"])  # fmt: skip
    assert [e["loss"] for e in _log(out)] == [e["loss"] for e in _log(ref)]


def _rl_yaml(tmp_path: Path, stage: str, **extra) -> Path:
    """A small run of `stage` on the tiny model, with the examples' reward functions (files users keep beside
    their configs)."""
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def share(prompts, completions, completion_ids, **kw):\n    return [0.5 for _ in completions]\n"
        "def raises(prompts, completions, **kw):\n    raise ValueError('no judge reachable')\n"
        "def not_finite(query, response):\n    return float('nan')\n"
        "def not_a_number(query, response):\n    return 'good'\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def one_arg(text):\n    return 1.0\n",
        encoding="utf-8",
    )
    values = {
        "model_name_or_path": TINY_MODEL,
        "stage": stage,
        "finetuning_type": "lora",
        "dataset": "alpaca_demo",
        "dataset_dir": DATA_DIR,
        "template": "chatml",
        "cutoff_len": 96,
        "max_samples": 16,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_new_tokens": 4,
        "max_steps": 2,
        "save_steps": 1,
        "output_dir": tmp_path / "out",
        "disable_tqdm": True,
        "reward_funcs": f"{rewards}:share",
        **extra,
    }
    config = tmp_path / f"{stage}.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in values.items() if v is not None), encoding="utf-8")
    return config


CONFIG_MISTAKES = [
    ("ppo", {"reward_funcs": None}, "reward_model: stage ppo scores completions with a reward model"),
    ("ppo", {"reward_funcs": None, "reward_model": TINY_MODEL, "finetuning_type": "full"}, "reward_model_type:"),
    ("ppo", {"reward_funcs": None, "reward_model": TINY_MODEL, "reward_model_type": "full"}, "reward_model:"),
    ("ppo", {"reward_model_type": "api"}, "reward_model_type: 'api' is not implemented"),
    ("grpo", {"reward_funcs": "nowhere/rewards.py:share"}, "reward_funcs: nowhere/rewards.py not found"),
    ("grpo", {"reward_funcs": "{rewards}:missing"}, "has no function 'missing'"),
    ("grpo", {"reward_funcs": "{rewards}:one_arg"}, "reward_funcs: one_arg in"),
    ("grpo", {"reward_funcs": None}, "reward_funcs: stage grpo needs at least one reward function"),
    ("grpo", {"per_device_train_batch_size": 3}, "per_device_train_batch_size: 3 completions per device"),
    ("grpo", {"val_size": 0.2}, "eval_dataset / val_size: stage grpo has no evaluation yet"),
    ("grpo", {"reward_weights": "[1.0, 2.0]"}, "reward_weights: 2 weights for 1 reward_funcs"),
    ("ppo_custom", {"reward_funcs": None}, "reward_funcs: custom_rewards/reward_functions.py not found"),
    ("ppo", {"reward_model": TINY_MODEL}, "reward_funcs: stage ppo scores with its reward_model"),
    ("grpo", {"reward_model": TINY_MODEL}, "reward_model: stage grpo scores with reward_funcs"),
    ("ppo_custom", {"reward_funcs": None, "reward_model": TINY_MODEL}, "reward_model: stage ppo_custom scores with"),
    ("grpo", {"num_beams": 2}, "num_beams: stage grpo samples its completions (num_beams 1), got 2"),
    ("grpo", {"do_sample": False}, "do_sample / temperature: grpo samples each group"),
    ("grpo", {"temperature": 0}, "do_sample / temperature: grpo samples each group"),
]


@pytest.mark.parametrize(("stage", "extra", "message"), CONFIG_MISTAKES, ids=[m[2][:40] for m in CONFIG_MISTAKES])
def test_a_config_mistake_is_one_line_before_anything_loads(tmp_path, capsys, stage, extra, message):
    from lf_dist.cli import main

    rewards = tmp_path / "rewards.py"
    extra = {k: (v.format(rewards=rewards) if isinstance(v, str) else v) for k, v in extra.items()}
    config = _rl_yaml(tmp_path, stage, **extra)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lf-dist: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


RUN_MISTAKES = [
    ("raises", "raises in {rewards} raised ValueError: no judge reachable on a batch of 4 (first prompt '"),
    ("not_finite", "not_finite in {rewards} returned nan for sample 0 (prompt '"),
    ("not_a_number", "not_a_number in {rewards} returned str 'good', not a number, for sample 0 (prompt '"),
    ("short", "short in {rewards} returned 1 rewards for 4 completions"),
]


@pytest.mark.parametrize(("func", "message"), RUN_MISTAKES, ids=[m[0] for m in RUN_MISTAKES])
def test_a_failing_reward_function_stops_the_run_in_one_line_naming_it(tmp_path, capsys, func, message):
    from lf_dist.cli import main

    rewards = tmp_path / "rewards.py"
    config = _rl_yaml(tmp_path, "grpo", reward_funcs=f"{rewards}:{func}")
    assert main(["train", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("lf-dist:")]
    assert len(err) == 1 and message.format(rewards=rewards) in err[0], err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists() and not list(
        (tmp_path / "out").glob("checkpoint-*")
    )


def _rl_plan(stage: str, profile: str, model: str = "Qwen2.5-7B", **keys):
    from lf_dist.planner import load_profile, make_plan
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    config = EXAMPLES / f"{stage}_lora.yaml"
    values = {"model_name_or_path": ROOT / "examples/model-configs" / model, "bf16": True, **keys}
    if stage != "ppo":
        values["reward_funcs"] = f"{EXAMPLES / 'custom_rewards/reward_functions.py'}:custom_reward"
    cfg = load_config(config, [f"{k}={v}" for k, v in values.items()])
    return make_plan(cfg, load_profile(profile), get_stage(stage), launching=False)


def test_the_plan_counts_a_rollouts_logits_kv_cache_gathered_weights_and_group_rows():
    base = {"per_device_train_batch_size": 8, "num_generations": 4, "max_new_tokens": 256, "cutoff_len": 512}
    one = _rl_plan("grpo", "a6000x1", "Qwen2.5-0.5B", **base).memory_gib
    # the update's logits: every completion position, fp32, log-softmax, its gradient and the entropy (bf16: 14 B)
    assert one["logits"] == pytest.approx(8 * 256 * 151_936 * 14 / 2**30, rel=1e-3)
    longer = _rl_plan("grpo", "a6000x1", "Qwen2.5-0.5B", **{**base, "max_new_tokens": 512}).memory_gib
    more_rows = _rl_plan("grpo", "a6000x1", "Qwen2.5-0.5B", **{**base, "per_device_train_batch_size": 16}).memory_gib
    assert longer["total"] > one["total"] and more_rows["total"] > one["total"]  # KV cache, activations, logits
    small = {**base, "per_device_train_batch_size": 4, "max_new_tokens": 64, "cutoff_len": 128}
    sharded = _rl_plan("grpo", "h100x8", strategy="fsdp2", finetuning_type="full", **small).memory_gib
    # generation gathers the whole model on every rank: 7/8 of its bf16 weights beyond the rank's own shard, on
    # top of what the run holds throughout
    gathered = 7_615_616_512 * 2 * 7 / 8 / 2**30
    held = sum(sharded[k] for k in ("weights", "gathered_layers", "optimizer", "runtime"))
    assert sharded["rollout"] > 0 and sharded["total"] >= held + gathered


def test_the_plan_counts_ppos_reward_model_and_reference_as_frozen_copies(tmp_path):
    from safetensors.torch import save_file

    rm = tmp_path / "rm"  # a reward model's folder as the planner reads it: its config (weights are not read)
    shutil.copytree(ROOT / "examples/model-configs/Qwen2.5-7B", rm)
    config = json.loads((rm / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = ["Qwen2ForSequenceClassification"]
    (rm / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({"score.weight": torch.zeros(1, config["hidden_size"])}, str(rm / "model.safetensors"))
    lora = _rl_plan("ppo", "h100x8", reward_model=tmp_path / "rm", reward_model_type="full").memory_gib
    assert lora["reference_model"] > 0  # LoRA: the reference is the policy with adapters off, the rm a copy
    full = _rl_plan(
        "ppo", "h100x8", reward_model=tmp_path / "rm", reward_model_type="full", finetuning_type="full",
        strategy="fsdp2",
    ).memory_gib  # fmt: skip
    assert full["reference_model"] == pytest.approx(2 * 7_615_616_512 * 2 / 8 / 2**30, rel=0.01)


def test_sigterm_checkpoints_a_grpo_run_that_the_same_command_resumes_bitwise(tmp_path):
    from lf_dist.errors import EXIT_PREEMPTED

    config = EXAMPLES / "grpo_lora.yaml"
    common = ["max_steps=4", "save_strategy=no", "per_device_train_batch_size=8", "disable_tqdm=true"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    _train(config, f"output_dir={ref}", *common)
    stopped = _run("train", config, f"output_dir={out}", *common, env={"LF_DIST_SIGNAL_AT_STEP": "2"})
    assert stopped.returncode == EXIT_PREEMPTED and (out / "checkpoint-2").is_dir(), stopped.stderr[-2000:]
    _train(config, f"output_dir={out}", *common)  # overwrite_output_dir: true keeps a preemption checkpoint
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_rollout_ends_at_the_templates_stop_words_as_chat_does():
    """llama3 ends a turn with <|eot_id|> (its eos after `fix_tokenizer`) or <|eom_id|>: both stop a completion."""
    from lf_dist.data.templates import fix_tokenizer, get_template, stop_token_ids
    from lf_dist.model import load_tokenizer
    from lf_dist.run_checks import load_config

    cfg = load_config(_rl_yaml_path(), ["template=llama3"])
    tokenizer = load_tokenizer(cfg)
    template = get_template("llama3", tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    ids = stop_token_ids(template, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in ids and tokenizer.eos_token_id in ids
    assert set(ids) == {tokenizer.convert_tokens_to_ids(w) for w in template.stop_words} | {tokenizer.eos_token_id}


def _rl_yaml_path() -> Path:
    return EXAMPLES / "grpo_lora.yaml"
