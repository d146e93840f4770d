"""fp8 (float8 training through torchao): refused in one line where there are no float8 tensor cores; on a CUDA GPU
(cuda-marked, benchmarks/gpu_fp8.sh) the linear layers become Float8Linear and the losses track bf16's, alone,
under FSDP2 with float8 all-gather, and under DeepSpeed ZeRO-3 (LLaMA-Factory's two fp8 examples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

FP8_EXAMPLES = ROOT / "tests" / "fixtures" / "lf_examples"


def _train(out: Path, *overrides: str, nproc: int | None = None, cwd: Path = ROOT):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if nproc:
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(nproc))
    return subprocess.run(
        [sys.executable, "-m", "lf_dist", "train", str(ROOT / "examples/tiny/sft_full.yaml"), f"output_dir={out}"]
        + ["max_steps=20", "logging_steps=1", "save_steps=1000", "disable_tqdm=true", "report_to=none", *overrides],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        check=False,
    )


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without float8 tensor cores")
def test_fp8_is_refused_in_one_line_without_a_cuda_gpu_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    done = _train(out, "fp8=true", "bf16=true")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1].startswith("lf-dist: error: fp8: float8 training needs a CUDA GPU"), lines[-1]
    assert not out.exists()


def test_fp8_keys_that_contradict_each_other_are_refused(tmp_path):
    done = _train(tmp_path / "out", "fp8_enable_fsdp_float8_all_gather=true")
    assert done.returncode == 2 and "fp8_enable_fsdp_float8_all_gather: needs fp8: true" in done.stderr
    done = _train(tmp_path / "out", "fp8=true", "fp8_backend=te")
    assert done.returncode == 2 and "fp8_backend: 'te' is not one of auto, torchao" in done.stderr


def test_float8_conversion_swaps_every_aligned_linear_layer_but_the_output_layer():
    from torchao.float8.float8_linear import Float8Linear
    from transformers import AutoConfig, AutoModelForCausalLM

    from lf_dist.kernels import float8

    with torch.device("meta"):  # conversion needs no GPU, and a sharded strategy converts a meta model
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "examples/tiny/model"))
    n = float8.apply(model)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert n == 2 * 7 and sum(isinstance(m, Float8Linear) for m in layers) == n  # q k v o gate up down × 2 layers
    assert not isinstance(model.get_output_embeddings(), Float8Linear)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_tracks_bf16_losses_on_one_gpu(tmp_path):
    from lf_dist.kernels import float8

    if float8.supported_here():
        pytest.skip(float8.supported_here())
    bf16 = _train(tmp_path / "bf16", "bf16=true")
    fp8 = _train(tmp_path / "fp8", "bf16=true", "fp8=true")
    assert bf16.returncode == 0 and fp8.returncode == 0, (bf16.stderr[-2000:], fp8.stderr[-2000:])
    assert "linear layers in float8" in fp8.stderr
    a, b = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp8")
    assert b[-1] < 0.7 * b[0]
    assert all(abs(x - y) <= 0.05 * x for x, y in zip(a, b)), (a, b)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=fsdp2", "fp8_enable_fsdp_float8_all_gather=true"),
        (f"deepspeed={FP8_EXAMPLES / 'examples/deepspeed/ds_z3_fp8_config.json'}",),
    ],
    ids=["fsdp2-float8-all-gather", "deepspeed-zero3"],
)
def test_fp8_under_sharded_backends_tracks_bf16(tmp_path, overrides):
    from lf_dist.kernels import float8

    if not torch.cuda.is_available() or float8.supported_here():
        pytest.skip("needs float8 tensor cores")
    ref = _train(tmp_path / "ref", "bf16=true", *overrides, nproc=1)
    fp8 = _train(tmp_path / "fp8", "bf16=true", "fp8=true", *overrides, nproc=1)
    assert ref.returncode == 0 and fp8.returncode == 0, (ref.stderr[-2000:], fp8.stderr[-2000:])
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "fp8")
    assert b[-1] < 0.7 * b[0]
    assert all(abs(x - y) <= 0.05 * x for x, y in zip(a, b)), (a, b)
