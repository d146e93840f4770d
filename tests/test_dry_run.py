"""`lf-dist plan --dry-run`: the planned model built on meta, sharded by FSDP2's real `parallelize()` under a fake
process group of the planned world size, holds per rank what the planner's terms say (`memory.state_bytes`)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.distributed as dist

from lf_dist.cli import main

from .conftest import DATA_DIR, ROOT

CONFIGS = ROOT / "examples" / "model-configs"
TOLERANCE = 0.01
STATES = ("parameters", "gradients", "optimizer")
LORA_RANK = 8

# (model, nodes of h100x8, method): 8, 64 and 1,024 ranks; HSDP shards within 8 ranks (within 4 at 8 ranks,
# where a shard group of 8 would be the whole world, plain FSDP)
METHODS = {
    "full": ["finetuning_type=full"],
    "lora": [],
    "qlora": ["quantization_bit=4"],
    "hsdp": ["finetuning_type=full", "fsdp_shard_size=8"],
}
SIZES = [("Llama-3.1-8B", 1), ("Llama-3.1-70B", 8), ("Llama-3.1-405B", 128)]
CASES = [(model, nodes, method) for model, nodes in SIZES for method in METHODS]
# QLoRA where some blocks do not split over the ranks: those layers stay bf16 and are listed
CASES.append(("Llama-3.1-8B", 128, "qlora"))


def _overrides(nodes: int, method: str) -> list[str]:
    if method == "hsdp" and nodes == 1:
        return ["finetuning_type=full", "fsdp_shard_size=4"]
    return METHODS[method]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A user's YAML (the model is set per case on the command line)."""
    folder = tmp_path_factory.mktemp("dry_run")
    path = folder / "sft.yaml"
    path.write_text(
        f"stage: sft\ndo_train: true\nfinetuning_type: lora\nlora_rank: {LORA_RANK}\nlora_target: all\n"
        f"dataset: alpaca_demo\ndataset_dir: {DATA_DIR}\ntemplate: llama3\ncutoff_len: 2048\n"
        f"output_dir: {folder / 'out'}\nper_device_train_batch_size: 1\nbf16: true\nstrategy: fsdp2\n",
        encoding="utf-8",
    )
    return path


_RESULTS: dict = {}


def dry_run(config, model: str, nodes: int, method: str) -> dict:
    """`lf-dist plan --dry-run ... --json` in this process (each case once per session)."""
    key = (model, nodes, method)
    if key not in _RESULTS:
        argv = ["plan", "--dry-run", str(config), f"model_name_or_path={CONFIGS / model}", *_overrides(nodes, method)]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([*argv, "--profile", "h100x8", "--nnodes", str(nodes), "--json"])
        assert code == 0
        assert not dist.is_initialized()  # the fake group is gone: the CLI can run again in this process
        _RESULTS[key] = json.loads(out.getvalue())
    return _RESULTS[key]


@pytest.mark.parametrize(("model", "nodes", "method"), CASES, ids=[f"{m}-{n * 8}-{k}" for m, n, k in CASES])
def test_sharded_meta_model_holds_what_the_planner_counts(config, model, nodes, method):
    result = dry_run(config, model, nodes, method)
    plan = result["plan"]
    assert plan["strategy"] == result["strategy"] and result["world_size"] == plan["world_size"] == nodes * 8
    assert plan["finetuning_type"] == ("full" if method in ("full", "hsdp") else "lora")
    assert plan["quantization_bit"] == (4 if method == "qlora" else None)
    shard = 4 if (method, nodes) == ("hsdp", 1) else 8 if method == "hsdp" else nodes * 8
    replicas = {"dp_replicate": nodes * 8 // shard} if shard < nodes * 8 else {}
    assert result["mesh"] == {**replicas, "dp_shard": shard}
    for state in STATES:  # what a rank allocates (FSDP2's padded shards, e.g. a row of every LoRA A past 8 ranks)
        assert result["rank0"][state] == pytest.approx(result["planned"][state], rel=TOLERANCE), state
        assert result["rank0"][state] >= result["even"][state]  # padding only adds
    if method == "qlora":
        assert result["nf4_weights"] > 0 and result["unquantized_layers"] == plan["unquantized_layers"]
    assert result["seconds"] < 30  # seconds, not minutes, at any size (2 CPU cores)


def test_unsplittable_nf4_blocks_are_listed(config):
    result = dry_run(config, "Llama-3.1-8B", 128, "qlora")
    assert result["unquantized_layers"] == {
        name: 32 for name in ("self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert result["nf4_weights"] == 2 * 32  # q_proj and o_proj split over 1,024 ranks


def test_the_text_report_puts_each_state_next_to_the_plan(config, capsys):
    argv = ["plan", "--dry-run", str(config), f"model_name_or_path={CONFIGS / 'Llama-3.1-8B'}", "quantization_bit=4"]
    assert main([*argv, "--profile", "h100x8", "--nnodes", "128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 4-bit QLoRA · fsdp2 · torchrun ×1024")
    assert "dry run: 4-bit QLoRA · fsdp2 over 1024 ranks (mesh dp_shard 1024)" in out
    for state in STATES:
        assert any(line.split()[:1] == [state] and line.rstrip().endswith("%") for line in out.splitlines())
    assert "unquantized, in the compute dtype (blocks do not split): self_attn.k_proj ×32" in out


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["strategy=ddp", "--profile", "h100x8"], "not ddp (8 rank(s)); set strategy: fsdp2"),
        (
            ["strategy=auto", f"deepspeed={ROOT / 'examples/deepspeed/ds_z3_config.json'}", "--profile", "h100x8"],
            "not DeepSpeed (8 rank(s)); set strategy: fsdp2",
        ),
        (["strategy=auto", "--profile", "a6000x1"], "not single (1 rank(s)); plan for more than one rank"),
    ],
)
def test_strategies_it_does_not_cover_are_refused_in_one_line(config, capsys, args, named):
    model = f"model_name_or_path={CONFIGS / 'Llama-3.1-8B'}"
    assert main(["plan", "--dry-run", str(config), model, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dry-run: covers strategy fsdp2 (HSDP with fsdp_shard_size)" in err[0], err
    assert named in err[0] and not dist.is_initialized()


def test_a_shard_size_that_does_not_divide_the_world_is_one_line(config, capsys):
    model = f"model_name_or_path={CONFIGS / 'Llama-3.1-8B'}"
    message = "lf-dist: error: fsdp_shard_size: 3 must divide the world size 8 (whole shard groups of ranks)"
    for dry in (["--dry-run"], []):  # the plan itself refuses it, before any dry run
        assert main(["plan", *dry, str(config), model, "fsdp_shard_size=3", "--profile", "h100x8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [message] and not dist.is_initialized()


@pytest.mark.parametrize(("rows", "ranks"), [(8, 1024), (8, 8), (5, 4), (128256, 1024), (1024, 64), (3, 2)])
def test_lazy_chunks_are_fsdp2s_chunks(rows, ranks):
    """The dry run hands FSDP2 its per-rank chunks on demand (building 1,024 per parameter is slow): the same
    tensors as torch's `_chunk_with_empty`."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

    from lf_dist.planner.dry_run import _Chunks

    tensor = torch.arange(rows * 3).view(rows, 3)
    lazy, eager = _Chunks(tensor, ranks, 0), _chunk_with_empty(tensor, ranks, 0)
    assert len(lazy) == len(eager) == ranks
    for i in sorted({0, 1, ranks // 2, ranks - 1, -1}):
        assert lazy[i].shape == eager[i].shape and torch.equal(lazy[i], eager[i]), i
