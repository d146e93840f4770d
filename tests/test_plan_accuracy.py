"""The plan's peak-memory estimate against the measured peak of real runs (CPU: the process's peak RSS).

A 39M-parameter Llama (hidden 512, 8 layers, vocabulary 16,384) trains 3 steps of packed pretraining rows
(every row exactly cutoff_len tokens) with full fine-tuning, LoRA and 4-bit QLoRA, each at 256 tokens without
and 512 tokens with gradient checkpointing; each run is its own process, so its peak RSS is its own. Every logged
step carries `planned_peak_memory_gb` next to `peak_memory_gb`; the estimate must hold within ±20%.
"""

from __future__ import annotations

import json

import pytest

from .conftest import ROOT, make_llama
from .test_distributed import lf_dist_train

pytestmark = pytest.mark.slow
# each method at both lengths and both checkpointing settings (benchmarks/plan_accuracy.py runs all 12)
CASES = [(m, gc, cut) for m in ("full", "lora", "qlora") for gc, cut in ((False, 256), (True, 512))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("acc") / "model", hidden=512, layers=8, intermediate=1408, vocab=16384)


@pytest.mark.parametrize(
    ("method", "checkpointing", "cutoff"), CASES, ids=[f"{m}-gc{int(g)}-{c}" for m, g, c in CASES]
)
def test_planned_peak_memory_is_within_20_percent_of_the_measured_peak(model, tmp_path, method, checkpointing, cutoff):
    finetuning = ["finetuning_type=lora", "quantization_bit=4"] if method == "qlora" else [f"finetuning_type={method}"]
    out = tmp_path / "out"
    lf_dist_train(
        ROOT / "examples" / "tiny" / "pt_full.yaml",
        f"model_name_or_path={model}",
        *finetuning,
        f"disable_gradient_checkpointing={str(not checkpointing).lower()}",
        f"cutoff_len={cutoff}",
        "per_device_train_batch_size=4",
        "max_steps=3",
        "logging_steps=1",
        "save_steps=1000",
        "disable_tqdm=true",
        f"output_dir={out}",
        nproc=None,
    )
    last = json.loads((out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    planned, measured = last["planned_peak_memory_gb"], last["peak_memory_gb"]
    assert planned == pytest.approx(measured, rel=0.2), (planned, measured)
    plan = json.loads((out / "run_plan.json").read_text(encoding="utf-8"))
    assert plan["gradient_checkpointing"] is checkpointing and plan["quantization_bit"] == (
        4 if method == "qlora" else None
    )
