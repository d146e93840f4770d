"""Online RL on every backend: two ranks generate the 1-process run's completions token for token and compute its
losses and rewards (statistics over the global batch), a killed 2-rank run resumes bitwise, and a reward function
that fails on one rank stops both in one line.

The global batch is the same everywhere: 2 prompts per step (grpo: 4 completions each, a group on one rank).
Generation on sharded weights keeping ranks in step when their completions end apart is
tests/test_seams.py::test_generation_on_training_weights_keeps_ranks_in_step_when_completions_end_apart.
grpo with LoRA on ddp, fsdp2, ZeRO-2 and ZeRO-3 is a column of tests/test_parity_table.py (this module's config
and assert_same_rollouts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from .conftest import DATA_DIR, ROOT, TINY_MODEL
from .test_distributed import lf_dist_train, losses, weights

pytestmark = pytest.mark.slow
REWARDS = ROOT / "examples/tiny/custom_rewards/reward_functions.py"
Z2, Z3 = ROOT / "examples/deepspeed/ds_z2_config.json", ROOT / "examples/deepspeed/ds_z3_config.json"


def _config(tmp_path: Path, stage: str, method: str, **extra) -> Path:
    values = {
        "model_name_or_path": TINY_MODEL,
        "stage": stage,
        "finetuning_type": method,
        "dataset": "alpaca_demo",
        "dataset_dir": DATA_DIR,
        "template": "chatml",
        "cutoff_len": 96,
        "max_samples": 64,
        "max_new_tokens": 12,
        "learning_rate": 5e-3 if method == "lora" else 1e-4,
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 1000,
        "disable_tqdm": True,
        "overwrite_output_dir": True,
        "disable_gradient_checkpointing": True,
        "log_completions": True,
        "report_to": "none",
        **(
            {"reward_funcs": f"{REWARDS}:even_word_share", "num_generations": 4, "beta": 0.04}
            if stage == "grpo"
            else {"reward_funcs": f"{REWARDS}:custom_reward", "ppo_score_norm": True, "ppo_buffer_size": 2}
            if stage == "ppo_custom"
            else {}
        ),
        **extra,
    }
    path = tmp_path / f"{stage}_{method}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()), encoding="utf-8")
    return path


# per-device batch of one rank (2 ranks) and of the 1-process reference: the same global batch
BATCH = {"grpo": (4, 8), "ppo_custom": (1, 2), "ppo": (1, 2)}


def _log(out: Path, key: str) -> list[float]:
    lines = (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [e[key] for e in map(json.loads, lines) if key in e]


def _completions(out: Path) -> list[tuple]:
    lines = (out / "completions.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["step"], r["index"], r["sample"], tuple(r["completion_ids"])) for r in map(json.loads, lines)]


def assert_same_rollouts(out: Path, ref: Path, atol: float = 1e-4, weight_atol: float = 5e-4) -> None:
    """Completions token for token; per-step loss, reward and KL within `atol`; final weights within
    `weight_atol` (ppo makes 8 AdamW updates per step here, which amplify summation-order differences)."""
    ours, theirs = _completions(out), _completions(ref)
    assert len(ours) == len(theirs) > 0 and ours == theirs  # token for token, in the same order
    for key in ("loss", "reward"):
        assert _log(out, key) == pytest.approx(_log(ref, key), abs=atol), key
    assert _log(out, "kl") == pytest.approx(_log(ref, "kl"), rel=atol, abs=atol)  # ppo's: a sum over ~12 tokens
    w, r = weights(out), weights(ref)
    assert w.keys() == r.keys()
    for k in r:
        torch.testing.assert_close(w[k], r[k], rtol=1e-3, atol=weight_atol)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rl")


@pytest.fixture(scope="module")
def reward_model(root) -> Path:
    out = root / "rm"
    lf_dist_train(ROOT / "examples/tiny/rm_lora.yaml", f"output_dir={out}", "max_steps=6", nproc=None)
    return out


def _reference(root: Path, stage: str, method: str, extra: dict) -> Path:
    """The 1-process run of (stage, method), made once per module."""
    out = root / f"ref_{stage}_{method}"
    if not (out / "trainer_log.jsonl").is_file():
        config = _config(root, stage, method, **extra)
        lf_dist_train(config, f"output_dir={out}", f"per_device_train_batch_size={BATCH[stage][1]}", nproc=None)
    return out


# grpo with LoRA on ddp, fsdp2, ZeRO-2 and ZeRO-3 (this config, compared the same way) is
# tests/test_parity_table.py's grpo-lora column
CASES = [
    ("grpo", "full", ["strategy=fsdp2"]),
    ("grpo", "full", [f"deepspeed={Z3}"]),
    ("ppo_custom", "lora", ["strategy=ddp"]),
    ("ppo_custom", "lora", ["strategy=fsdp2"]),
    ("ppo_custom", "full", ["strategy=fsdp2"]),
    ("ppo_custom", "lora", [f"deepspeed={Z2}"]),
    ("ppo_custom", "lora", [f"deepspeed={Z3}"]),
    ("ppo", "lora", ["strategy=fsdp2"]),
    ("ppo", "lora", [f"deepspeed={Z3}"]),
]


@pytest.mark.parametrize(
    ("stage", "method", "overrides"),
    CASES,
    ids=[f"{s}-{m}-{o[0].split('=')[1] if 'strategy' in o[0] else Path(o[0]).stem}" for s, m, o in CASES],
)
def test_two_ranks_generate_and_learn_as_one_process(root, reward_model, tmp_path, stage, method, overrides):
    extra = {"reward_model": reward_model} if stage == "ppo" else {}
    ref = _reference(root, stage, method, extra)
    out = tmp_path / "out"
    config = _config(tmp_path, stage, method, **extra)
    lf_dist_train(config, f"output_dir={out}", f"per_device_train_batch_size={BATCH[stage][0]}", *overrides)
    assert_same_rollouts(out, ref)


def test_fsdp2_run_killed_after_its_second_checkpoint_resumes_bitwise(root, tmp_path):
    """kill -9 of rank 1 after step 5; torchrun restarts the group, which resumes from checkpoint-4."""
    config = _config(tmp_path, "grpo", "lora", max_steps=6, save_steps=2)
    common = ["strategy=fsdp2", f"per_device_train_batch_size={BATCH['grpo'][0]}"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    lf_dist_train(config, f"output_dir={ref}", *common)
    proc = lf_dist_train(
        config,
        f"output_dir={out}",
        *common,
        env={"MAX_RESTARTS": "1", "LF_DIST_KILL_AT_STEP": "5", "LF_DIST_KILL_RANK": "1"},
        timeout=400,
    )
    assert "resuming from checkpoint-4" in proc.stdout + proc.stderr
    assert losses(out) == losses(ref)
    w, r = weights(out), weights(ref)
    assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in r)


def test_a_reward_function_failing_on_one_rank_stops_both_in_one_line(tmp_path):
    rewards = tmp_path / "rank_rewards.py"
    rewards.write_text(
        "import os\n\n"
        "calls = 0\n\n"
        "def judge(prompts, completions, completion_ids, **kwargs):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if os.environ.get('RANK') == '1' and calls == 2:\n"
        "        raise TimeoutError('the judge did not answer')\n"
        "    return [0.5] * len(completions)\n",
        encoding="utf-8",
    )
    config = _config(tmp_path, "grpo", "lora", reward_funcs=f"{rewards}:judge", save_steps=1, ddp_timeout=600)
    out = tmp_path / "out"
    start = time.monotonic()
    proc = lf_dist_train(config, f"output_dir={out}", "strategy=fsdp2", "per_device_train_batch_size=4", check=False)
    assert proc.returncode == 2 and time.monotonic() - start < 120, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lf-dist: ")]
    assert errors and all("judge in" in e and "raised TimeoutError: the judge did not answer" in e for e in errors)
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()  # the last checkpoint, intact
    assert not (out / "adapter_model.safetensors").exists()
