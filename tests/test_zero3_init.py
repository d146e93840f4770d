"""ZeRO-3 builds its models sharded: the policy and a frozen reference are created inside `deepspeed.zero.Init`, so
no rank ever holds the whole model, and two ranks train as one process does.

The first test runs this module under torchrun (`_rank_main`): it records each model as the factory returns it,
before any DeepSpeed engine exists, so a partitioned parameter there can only come from zero.Init.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA_DIR, ROOT, TINY_MODEL, base_overrides, make_llama
from .test_distributed import lf_dist_train, losses

pytestmark = pytest.mark.slow
Z3 = ROOT / "examples" / "deepspeed" / "ds_z3_config.json"


def _recorded(build, role: str, records: dict):
    """`build` as a factory that records what this rank holds of the model it returns."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from lf_dist.parallel.base import storage_bytes

    def factory(meta: bool):
        model = build(meta)
        params = list(model.parameters())
        embeddings = model.get_input_embeddings().weight
        records[role] = {
            "inside_zero3": is_deepspeed_zero3_enabled(),
            "vocab": list(getattr(embeddings, "ds_shape", embeddings.shape))[0],
            "placeholders": all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in params),
            "shard_bytes": sum(storage_bytes(p) for p in params),
            "whole_bytes": sum(p.ds_numel * p.ds_tensor.element_size() for p in params if hasattr(p, "ds_numel")),
        }
        return model

    return factory


def _rank_main(out: Path, overrides: list[str]) -> None:
    """One rank: the policy (create_model) and a frozen reference (prepare_frozen), each recorded as built."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from lf_dist.model import load_tokenizer
    from lf_dist.model.recipe import ModelRecipe
    from lf_dist.parallel import build_strategy
    from lf_dist.planner import detect, make_plan
    from lf_dist.run_checks import load_config
    from lf_dist.train.stages import get_stage

    cfg = load_config(None, overrides)
    cfg = make_plan(cfg, detect(), get_stage(cfg.finetuning.stage)).resolve(cfg)
    strategy = build_strategy(cfg)
    tokenizer = load_tokenizer(cfg)
    records: dict = {}
    strategy.create_model(_recorded(ModelRecipe(cfg, tokenizer).build, "policy", records))
    records["zero3_after_policy"] = is_deepspeed_zero3_enabled()
    reference = ModelRecipe(cfg, tokenizer, path=str(TINY_MODEL))
    strategy.prepare_frozen(_recorded(reference.build, "reference", records))
    records["zero3_after_reference"] = is_deepspeed_zero3_enabled()
    (out / f"rank{strategy.rank}.json").write_text(json.dumps(records), encoding="utf-8")
    strategy.teardown()


def test_policy_and_reference_are_built_as_shards_inside_zero_init(tmp_path):
    from lf_dist.ports import free_port

    overrides = base_overrides(tmp_path / "run", finetuning_type="full", deepspeed=Z3, strategy="deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, "-m", "tests.test_zero3_init", str(tmp_path), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    vocab = json.loads((TINY_MODEL / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    for rank in (0, 1):
        records = json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8"))
        for role in ("policy", "reference"):
            built = records[role]
            assert built["inside_zero3"] and built["placeholders"], (rank, role, built)
            assert built["shard_bytes"] == pytest.approx(built["whole_bytes"] / 2, rel=0.05), (rank, role, built)
            assert built["vocab"] == vocab  # a placeholder's empty shape must not read as "resize the embeddings"
        # the HfDeepSpeedConfig is gone once each model is built: nothing later is partitioned by accident
        assert not records["zero3_after_policy"] and not records["zero3_after_reference"]


def _config(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "z3_full.yaml"
    path.write_text(
        f"""model_name_or_path: {model}
dataset: alpaca_demo
dataset_dir: {DATA_DIR}
template: chatml
cutoff_len: 32
max_samples: 16
finetuning_type: full
deepspeed: {Z3}
learning_rate: 1.0e-4
max_steps: 2
logging_steps: 1
save_strategy: "no"
disable_tqdm: true
overwrite_output_dir: true
disable_gradient_checkpointing: true
""",
        encoding="utf-8",
    )
    return path


def _results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text(encoding="utf-8"))


def test_two_ranks_hold_half_the_weights_of_one_and_peak_lower_on_a_100m_model(tmp_path):
    """A ~100M-parameter Llama (413 MB in fp32), full fine-tuning: 2 ranks with the global batch of 1 rank."""
    model = make_llama(tmp_path / "llama100m", hidden=768, layers=12, intermediate=3072)
    config, one, two = _config(tmp_path, model), tmp_path / "one", tmp_path / "two"
    lf_dist_train(config, f"output_dir={one}", "per_device_train_batch_size=2", nproc=1)
    lf_dist_train(config, f"output_dir={two}", "per_device_train_batch_size=1", nproc=2)
    (weights,), (peak,) = _results(one)["weight_bytes_per_rank"], _results(one)["peak_memory_gb_per_rank"]
    assert weights > 400e6
    for rank_weights in _results(two)["weight_bytes_per_rank"]:
        assert rank_weights == pytest.approx(weights / 2, rel=0.05)
    for rank_peak in _results(two)["peak_memory_gb_per_rank"]:
        assert rank_peak < peak - weights / 3 / 2**30, (_results(two)["peak_memory_gb_per_rank"], peak, weights)
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)


if __name__ == "__main__":  # a rank of the first test, under torchrun
    _rank_main(Path(sys.argv[1]), sys.argv[2:])
