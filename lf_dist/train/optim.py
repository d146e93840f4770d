"""AdamW over the trainable parameters (torch's, or bitsandbytes' 8-bit / paged 8-bit with `optim`), or the
optimizer of a method the config turns on (train/optimizers.py), and the learning-rate schedule (transformers')."""

from __future__ import annotations

import math

import torch


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    from lf_dist.train.optimizers import build_method_optimizer

    method = build_method_optimizer(model, cfg)
    if method is not None:
        return method
    training_args = cfg.train
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Biases and norm weights (1-D) are not decayed, as in Hugging Face's Trainer. Under ZeRO-3 a
            # parameter is an empty 1-D placeholder here; its real shape is `ds_shape`.
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": training_args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = {
        "lr": training_args.learning_rate,
        "betas": (training_args.adam_beta1, training_args.adam_beta2),
        "eps": training_args.adam_epsilon,
    }
    if training_args.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if training_args.optim.startswith("paged") else bnb.optim.AdamW8bit
        return cls(groups, **kwargs)
    # fused: one kernel over all parameters (CPU and CUDA, DTensor shards too); else the multi-tensor path
    fused = training_args.optim == "adamw_torch_fused"
    return torch.optim.AdamW(groups, **kwargs, **({"fused": True} if fused else {"foreach": True}))


def warmup_steps(cfg, total_steps: int) -> int:
    training_args = cfg.train
    if training_args.warmup_steps >= 1:
        return int(training_args.warmup_steps)
    ratio = training_args.warmup_steps if training_args.warmup_steps > 0 else training_args.warmup_ratio
    return math.ceil(ratio * total_steps)


def build_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    from lf_dist.train.optimizers import LayerwiseOptimizer, attach_layerwise_schedulers

    def make(opt):
        return get_scheduler(
            cfg.train.lr_scheduler_type,
            opt,
            num_warmup_steps=warmup_steps(cfg, total_steps),
            num_training_steps=total_steps,
        )

    if isinstance(optimizer, LayerwiseOptimizer):  # each parameter's optimizer follows its own schedule
        attach_layerwise_schedulers(optimizer, make)
    return make(optimizer)
