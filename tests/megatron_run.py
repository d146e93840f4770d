"""Runs lf-dist's megatron strategy on CPU ranks for the tests: the shim (tests/megatron_shim.py) runs
megatron-core's layers on CPU over gloo, and `use_cpu` tells lf-dist's megatron runtime that this CPU is where
they run (lf-dist itself refuses strategy megatron without CUDA).

Each scenario runs in `world` processes started by `spawn` and leaves rank 0's result in `out/result.pt`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests import megatron_shim


def use_cpu() -> None:
    from lf_dist.parallel.megatron import runtime

    megatron_shim.activate()
    runtime.device = lambda: torch.device("cpu")
    runtime.has_cuda = lambda: False


def spawn(target, world: int, *args) -> None:
    """`target(*args)` on `world` ranks of a fresh gloo world on 127.0.0.1."""
    port = megatron_shim.free_port()
    mp.start_processes(_entry, args=(world, port, target, args), nprocs=world, join=True, start_method="spawn")


def _entry(rank: int, world: int, port: int, target, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    use_cpu()
    target(*args)


def megatron_config(out: Path, model: Path, **keys):
    """A run config for strategy megatron on `model`, the keys a user leaves alone at their defaults."""
    from lf_dist.run_checks import load_config
    from tests.conftest import base_overrides

    values = {"model_name_or_path": str(model), "strategy": "megatron", "finetuning_type": "full", **keys}
    return load_config(None, base_overrides(out, **values))


def _main_grads_as_weights(modules):
    """Each trained parameter's reduced gradient in place of its value (restored by the returned function), so
    the weight gatherers give gradients in Hugging Face names."""
    saved = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and getattr(p, "main_grad", None) is not None:
                saved.append((p, p.data.clone()))
                p.data.copy_(p.main_grad.view_as(p).to(p.dtype))

    def restore():
        for p, value in saved:
            p.data.copy_(value)

    return restore


def grads_scenario(out: str, model: str, micro_batches_by_dp: list, keys: dict) -> None:
    """One step of forward/backward: rank 0 saves the loss per label token and the gradients in HF names
    (the full model's, or a LoRA run's peft adapter)."""
    from lf_dist.parallel.megatron.strategy import MegatronStrategy
    from lf_dist.train.losses import CausalLMLoss

    cfg = megatron_config(Path(out) / "run", Path(model), **keys)
    strategy = MegatronStrategy(cfg)
    chunks = strategy.create_model(None)
    model_, optimizer = strategy.setup(chunks, None)
    loss = CausalLMLoss()
    mine = micro_batches_by_dp[strategy.dp_rank]
    n_units = strategy.all_reduce_sum(sum(loss.num_units(b) for b in mine))
    loss_sum, _ = strategy.forward_backward(model_, mine, loss, n_units)
    loss_total = float(strategy.all_reduce_sum(loss_sum)) / n_units
    modules = [c.module for c in model_]
    restore = _main_grads_as_weights(modules)
    if cfg.finetuning.finetuning_type == "lora":
        from lf_dist.parallel.megatron.lora_peft import gather_peft_adapter

        grads = gather_peft_adapter(modules, strategy.hf_config)
    else:
        from lf_dist.parallel.megatron.weights import gather_hf_state_dict

        grads = gather_hf_state_dict(modules, strategy.hf_config)
    grads = {k: v.detach().clone() for k, v in grads.items()} if grads is not None else None  # some are views
    restore()
    norm = strategy.step(model_, optimizer, 0.0)
    if strategy.is_main:
        torch.save({"loss": loss_total, "grads": grads, "norm": norm}, Path(out) / "result.pt")
    strategy.teardown()


def train_scenario(keys: dict, out: str, model: str) -> None:
    """A whole run through the worker (plan, data, loop, checkpoints, export), as `lf-dist train` makes it."""
    from lf_dist.worker import run

    run(megatron_config(Path(out), Path(model), **keys))


def nonfinite_scenario(out: str, model: str, batch: dict) -> None:
    """A step whose gradient norm is not finite leaves the weights as they were; a finite one clips and moves them.
    Rank 0 saves (the two norms, whether the weights moved after each)."""
    from lf_dist.parallel.megatron.strategy import MegatronStrategy
    from lf_dist.train.losses import CausalLMLoss

    strategy = MegatronStrategy(megatron_config(Path(out) / "run", Path(model)))
    model_, optimizer = strategy.setup(strategy.create_model(None), None)
    loss, params = CausalLMLoss(), [p for p in model_.parameters() if p.requires_grad]
    moved = []
    for poison in (True, False):
        before = [p.detach().clone() for p in params]
        strategy.forward_backward(model_, [batch], loss, loss.num_units(batch))
        if poison:
            params[0].main_grad.view(-1)[0] = float("nan")
        norm = strategy.step(model_, optimizer, 1.0)
        moved.append((norm, any(not torch.equal(b, p) for b, p in zip(before, params))))
    if strategy.is_main:
        torch.save(moved, Path(out) / "result.pt")
    strategy.teardown()
