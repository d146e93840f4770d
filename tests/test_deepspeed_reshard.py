"""A DeepSpeed checkpoint resumed on another world size (through DeepSpeed's universal checkpoint) continues the
run that was never interrupted.

A 2-rank run crashes at step 6 after saving checkpoint-4; it is resumed on 1 or 4 ranks with the same global
batch (4), through `lf-dist train` as a user would, and must reach the 1-process run's losses within 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lf_dist.parallel import ds_universal

from .test_distributed import _config, assert_same_training, lf_dist_train, losses, reference  # noqa: F401

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).parents[1] / "examples" / "deepspeed"
NOTICE = "DeepSpeed's universal checkpoint"


def _ds_config(tmp_path: Path, stage: str) -> str:
    """The shipped ZeRO-2 config (round_robin_gradients on: DeepSpeed's own slice links get that layout wrong), or
    the ZeRO-3 one with small sub-groups (several fp32 partitions: DeepSpeed's universal load shares their step)."""
    if stage == "zero2":
        return f"deepspeed={EXAMPLES / 'ds_z2_config.json'}"
    ds = json.loads((EXAMPLES / "ds_z3_config.json").read_text(encoding="utf-8"))
    ds["zero_optimization"]["sub_group_size"] = 100_000  # the tiny model's 427k parameters in five sub-groups
    path = tmp_path / "ds_z3_small_sub_groups.json"
    path.write_text(json.dumps(ds), encoding="utf-8")
    return f"deepspeed={path}"


def _crashed(tmp_path: Path, method: str, ds: str) -> tuple[Path, Path]:
    """A 2-rank run stopped at step 6, with checkpoint-4 written by 2 ranks."""
    config, out = _config(tmp_path, method), tmp_path / "crashed"
    crashed = lf_dist_train(
        config, f"output_dir={out}", ds, "save_steps=4", env={"LF_DIST_FAIL_AT_STEP": "6"}, check=False
    )
    assert crashed.returncode != 0
    assert (out / "checkpoint-4" / "ds").is_dir() and not (out / "checkpoint-8").exists()
    assert (out / "checkpoint-4" / "ds_world_size.txt").read_text(encoding="utf-8") == "2"
    return config, out


def _resume(config: Path, crashed: Path, out: Path, ds: str, ranks: int):
    shutil.copytree(crashed, out)  # the crashed run stays as it was, for another resume
    return lf_dist_train(
        config,
        f"output_dir={out}",
        ds,
        "resume_from_checkpoint=true",
        "overwrite_output_dir=false",
        f"per_device_train_batch_size={4 // ranks}",
        nproc=ranks,
        timeout=600,
    )


CASES = [("zero2", "full", 1), ("zero2", "lora", 4), ("zero3", "full", 4), ("zero3", "lora", 1)]


@pytest.mark.parametrize(("stage", "method", "ranks"), CASES, ids=[f"{s}-{m}-2to{r}" for s, m, r in CASES])
def test_deepspeed_checkpoint_resumes_on_another_world_size(reference, tmp_path, stage, method, ranks):  # noqa: F811
    ds = _ds_config(tmp_path, stage)
    config, crashed = _crashed(tmp_path, method, ds)
    out = tmp_path / f"on{ranks}"
    resumed = _resume(config, crashed, out, ds, ranks)
    assert_same_training(out, reference / method)
    lines = resumed.stderr.splitlines()
    (notice,) = [line for line in lines if NOTICE in line]  # one line, once
    assert f"checkpoint-4 was saved on 2 ranks; converted it to {NOTICE}" in notice
    assert notice.endswith(f"to resume on {ranks}")
    (changes,) = [line for line in lines if "resuming checkpoint-4 with changes" in line]
    assert f"data-parallel ranks 2 → {ranks}" in changes
    converted = out / "checkpoint-4" / ds_universal.FOLDER
    assert (converted / "ds" / "zero").is_dir() and not (out / "checkpoint-4" / f".tmp-{ds_universal.FOLDER}").exists()
    print(f"{stage} {method} 2→{ranks}: max |Δloss| {_max_delta(out, reference / method):.2e}")


def _max_delta(out: Path, ref: Path) -> float:
    return max(abs(a - b) for a, b in zip(losses(out), losses(ref), strict=True))


def test_failed_conversion_leaves_nothing_to_trust(tmp_path):
    """A conversion that fails (here: no engine files at all) leaves neither the universal folder nor its
    temporary one; a temporary folder an interrupted conversion left is not taken for a conversion."""
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "ds").mkdir(parents=True)
    (checkpoint / f".tmp-{ds_universal.FOLDER}" / "ds" / "zero").mkdir(parents=True)  # an interrupted one
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever DeepSpeed's converter raises
        ds_universal.convert(checkpoint, "ds")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["ds"]
