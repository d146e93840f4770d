"""`lf-dist export` of a checkpoint-N written by a sharded backend (DCP shards of ddp / fsdp2, a DeepSpeed engine
checkpoint) gives the model of the 1-process run's checkpoint-N (a Hugging Face folder), as a merged model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from .conftest import TINY_MODEL
from .test_distributed import _config, lf_dist_train

pytestmark = pytest.mark.slow
SAVE = 5
DS = Path(__file__).parents[1] / "examples" / "deepspeed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    for method in ("full", "lora"):
        lf_dist_train(
            _config(root, method),
            f"output_dir={root / method}",
            "per_device_train_batch_size=4",
            f"save_steps={SAVE}",
            nproc=None,
        )
    return root


def _reference_model(ckpt: Path):
    if (ckpt / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), ckpt).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(ckpt)


def _export(tmp_path: Path, ckpt: Path, as_adapter: bool) -> Path:
    out = tmp_path / "exported"
    source = (
        f"adapter_name_or_path: {ckpt}\nmodel_name_or_path: {TINY_MODEL}\n"
        if as_adapter
        else (f"model_name_or_path: {ckpt}\n")
    )
    cfg = tmp_path / "export.yaml"
    cfg.write_text(source + f"template: chatml\nexport_dir: {out}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "lf_dist", "export", str(cfg)], capture_output=True, text=True, encoding="utf-8"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


CASES = [
    ("fsdp2", "lora", ["strategy=fsdp2"], "dcp"),
    ("ddp", "full", ["strategy=ddp"], "dcp"),
    ("zero3", "lora", [f"deepspeed={DS / 'ds_z3_config.json'}"], "ds"),
    ("zero2", "full", [f"deepspeed={DS / 'ds_z2_config.json'}"], "ds"),
]


@pytest.mark.parametrize(("name", "method", "overrides", "layout"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_sharded_checkpoint_exports_to_the_one_process_model(reference, tmp_path, name, method, overrides, layout):
    run = tmp_path / "run"
    lf_dist_train(_config(tmp_path, method), f"output_dir={run}", f"save_steps={SAVE}", *overrides)
    ckpt = run / f"checkpoint-{SAVE}"
    assert (ckpt / layout).is_dir() and not list(ckpt.glob("*.safetensors"))  # shards, not a HF folder
    exported = AutoModelForCausalLM.from_pretrained(_export(tmp_path, ckpt, as_adapter=method == "lora"))
    expected = _reference_model(reference / method / f"checkpoint-{SAVE}")
    got, want = exported.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4)
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, expected(ids).logits, rtol=1e-3, atol=1e-3)
