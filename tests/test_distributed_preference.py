"""DPO on two ranks trains to the 1-process losses and weights, with the reference model placed by each backend:
a full frozen copy per rank (ddp), sharded like the policy (fsdp2), partitioned by an optimizer-less ZeRO-3
engine (deepspeed). So does the reward model (stage rm), whose score head sits in FSDP2's root unit. LoRA DPO
(the reference is the policy with its adapters disabled) on every backend is tests/test_parity_table.py's
dpo-lora column."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import DATA_DIR, TINY_MODEL
from .test_distributed import assert_same_training, lf_dist_train

pytestmark = pytest.mark.slow
Z3 = Path(__file__).parents[1] / "examples/deepspeed/ds_z3_config.json"


def _config(tmp_path: Path, method: str, stage: str = "dpo") -> Path:
    path = tmp_path / f"{stage}_{method}.yaml"
    path.write_text(
        f"""model_name_or_path: {TINY_MODEL}
stage: {stage}
pref_beta: 0.1
dataset: ranking_demo
dataset_dir: {DATA_DIR}
template: chatml
cutoff_len: 96
max_samples: 64
finetuning_type: {method}
per_device_train_batch_size: 2
learning_rate: {5e-3 if method == "lora" else 1e-3}
max_steps: 6
logging_steps: 1
save_steps: 1000
disable_tqdm: true
overwrite_output_dir: true
disable_gradient_checkpointing: true
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_ref")
    lf_dist_train(_config(root, "full"), f"output_dir={root / 'full'}", "per_device_train_batch_size=4", nproc=None)
    for method in ("full", "lora"):
        lf_dist_train(
            _config(root, method, "rm"), f"output_dir={root / 'rm' / method}", "per_device_train_batch_size=4",
            nproc=None,
        )  # fmt: skip
    return root


CASES = [
    ("ddp", "full", ["strategy=ddp"]),
    ("fsdp2", "full", ["strategy=fsdp2"]),
    ("zero3", "full", [f"deepspeed={Z3}"]),
]


@pytest.mark.parametrize(("name", "method", "overrides"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_dpo_on_two_ranks_matches_one_process(one_process, tmp_path, name, method, overrides):
    out = tmp_path / "out"
    lf_dist_train(_config(tmp_path, method), f"output_dir={out}", *overrides)
    assert_same_training(out, one_process / method)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_rm_on_two_fsdp2_ranks_matches_one_process(one_process, tmp_path, method):
    out = tmp_path / "out"
    lf_dist_train(_config(tmp_path, method, "rm"), f"output_dir={out}", "strategy=fsdp2")
    assert_same_training(out, one_process / "rm" / method)
