"""LLaMA-Factory's optimizer methods, each through the library that owns it (GaLore, APOLLO, BAdam, Adam-mini,
torch's Muon), and LoRA+'s param groups, grouped as LF does (train/trainer_utils.py, create_custom_optimizer).

The libraries are imported only when a config turns their method on. Every optimizer here is a torch Optimizer whose
`param_groups` the learning-rate scheduler drives; the layer-wise variants step each parameter in its own
post-accumulate-grad hook and hand the loop a `LayerwiseOptimizer` that only carries the schedule.
"""

from __future__ import annotations

import torch

from lf_dist.errors import UserError

EIGHT_BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")


def build_method_optimizer(model, cfg) -> torch.optim.Optimizer | None:
    """The optimizer a method of `cfg` asks for (LF's order of precedence), or None for plain AdamW."""
    f = cfg.finetuning
    if f.use_galore:
        return _galore(model, cfg)
    if f.use_apollo:
        return _apollo(model, cfg)
    if f.loraplus_lr_ratio is not None:
        return _loraplus(model, cfg)
    if f.use_badam:
        return _badam(model, cfg)
    if f.use_adam_mini:
        return _adam_mini(model, cfg)
    if f.use_muon:
        return _muon(model, cfg)
    return None


# -- LF's parameter grouping ---------------------------------------------------------------------------------
def _hf_config(model):
    """The transformers config under DDP / DeepSpeed / peft wrappers."""
    inner = model
    while not hasattr(inner, "config") and isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    return inner.config


def decay_parameter_names(model) -> set[str]:
    """LF's _get_decay_parameter_names: every weight outside nn.LayerNorm modules whose name has no "bias" (an
    RMSNorm's weight is decayed, as in LF)."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    return {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}


def _split_decay(model, exclude: set[int] = frozenset()) -> tuple[list, list]:
    """Trainable parameters not in `exclude` (by id): (decay, no_decay) by LF's rule."""
    names = decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in exclude:
            (decay if name in names else no_decay).append(param)
    return decay, no_decay


def linear_targets(model, target: str) -> list[str]:
    """`galore_target` / `apollo_target`: comma-separated module names; "all" is every linear module but the
    output layer (LF's find_all_linear_modules)."""
    targets = [t.strip() for t in target.split(",") if t.strip()]
    if targets != ["all"]:
        return targets
    found = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if "lm_head" not in name and "Linear" in kind and "Embedding" not in kind:
            found.add(name.split(".")[-1])
    return sorted(found)


def _projected(model, target: str) -> list[torch.nn.Parameter]:
    """The 2-D trainable weights of the nn.Linear modules the target names (LF's galore_params)."""
    targets = linear_targets(model, target)
    params = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(t in name for t in targets):
            params += [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    return params


def _adam_kwargs(cfg) -> dict:
    t = cfg.train
    return {"lr": t.learning_rate, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}


# -- GaLore and APOLLO -----------------------------------------------------------------------------------------
class _SavableProjectors:
    """Checkpoints hold each projector as a dict of its tensors and numbers, so they load with `weights_only` and
    through DCP; `load_state_dict` rebuilds the projector objects (proj_type from the group: torch's state loading
    turns strings into generators)."""

    def state_dict(self):
        state = super().state_dict()
        state["state"] = {
            k: {**s, "projector": {a: v for a, v in vars(s["projector"]).items() if not isinstance(v, str)}}
            if "projector" in s
            else s
            for k, s in state["state"].items()
        }
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                saved = self.state.get(param, {}).get("projector")
                if isinstance(saved, dict):
                    projector = object.__new__(self._projector_class(group))
                    projector.__dict__.update(saved, proj_type=group["proj_type"])
                    self.state[param]["projector"] = projector


def _galore_class(optim: str):
    import galore_torch

    if optim in EIGHT_BIT:
        base = galore_torch.GaLoreAdamW8bit
    elif optim == "adafactor":
        base = galore_torch.GaLoreAdafactor
    else:  # torch's AdamW variants (and the optims lf-dist ignores): GaLore's AdamW
        base = galore_torch.GaLoreAdamW
    from galore_torch.galore_projector import GaLoreProjector

    return type(
        base.__name__, (_SavableProjectors, base), {"_projector_class": staticmethod(lambda g: GaLoreProjector)}
    )


def _galore(model, cfg):
    f, t = cfg.finetuning, cfg.train
    extra = {"rank": f.galore_rank, "update_proj_gap": f.galore_update_interval, "scale": f.galore_scale}
    extra["proj_type"] = f.galore_proj_type
    cls = _galore_class(t.optim)
    if t.optim == "adafactor":  # Hugging Face's Adafactor arguments for optim adafactor
        kwargs = {"lr": t.learning_rate, "scale_parameter": False, "relative_step": False}
    else:
        kwargs = _adam_kwargs(cfg) | ({} if t.optim in EIGHT_BIT else {"no_deprecation_warning": True})
    return _low_rank(model, cfg, cls, kwargs, _projected(model, f.galore_target), extra, f.galore_layerwise)


def _apollo(model, cfg):
    import apollo_torch
    from apollo_torch.random_projector import GradientProjector
    from apollo_torch.svd_projector import GaLoreProjector

    f, t = cfg.finetuning, cfg.train
    if t.optim in EIGHT_BIT or t.optim == "adafactor":
        raise UserError(f"use_apollo: runs APOLLO's AdamW; optim {t.optim} is not supported with it (use adamw_torch)")
    extra = {"rank": f.apollo_rank, "proj": f.apollo_proj, "proj_type": f.apollo_proj_type}
    extra |= {"update_proj_gap": f.apollo_update_interval, "scale": f.apollo_scale, "scale_type": f.apollo_scale_type}

    def projector_class(group):
        return GradientProjector if group["proj"] == "random" else GaLoreProjector

    base = apollo_torch.APOLLOAdamW
    cls = type(base.__name__, (_SavableProjectors, base), {"_projector_class": staticmethod(projector_class)})
    # LF passes scale_front in the group, where APOLLO never reads it: the constructor does
    kwargs = _adam_kwargs(cfg) | {"scale_front": f.apollo_scale_front}
    return _low_rank(model, cfg, cls, kwargs, _projected(model, f.apollo_target), extra, f.apollo_layerwise)


def _low_rank(model, cfg, cls, kwargs: dict, projected: list, extra: dict, layerwise: bool):
    """LF's groups: no-decay, decay, and the projected weights (decayed) with the method's arguments."""
    wd = cfg.train.weight_decay
    decay, no_decay = _split_decay(model, {id(p) for p in projected})
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": wd},
        {"params": projected, "weight_decay": wd, **extra},
    ]
    if not layerwise:
        return cls([g for g in groups if g["params"]], **kwargs)
    per_param = {}
    for group in groups:
        for param in group["params"]:
            per_param[param] = cls([{**group, "params": [param]}], **kwargs)
            param.register_post_accumulate_grad_hook(_step_in_backward(per_param))
    return LayerwiseOptimizer(cfg.train.learning_rate, per_param)


def _step_in_backward(per_param: dict):
    def hook(param):
        if param.grad is not None:
            per_param[param].step()
            per_param[param].zero_grad(set_to_none=True)

    return hook


class LayerwiseOptimizer(torch.optim.Optimizer):
    """LF's DummyOptimizer: every parameter has its own optimizer, stepped in its backward hook; this one only
    carries the learning rate the loop's scheduler moves and logs. Its state is in hooks, not in a checkpoint."""

    def __init__(self, lr: float, per_param: dict):
        self.per_param = per_param
        super().__init__([torch.zeros(1, 1)], {"lr": lr})

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self, closure=None):
        return None

    def load_state_dict(self, state_dict) -> None:
        raise UserError(
            "resume_from_checkpoint: galore_layerwise / apollo_layerwise keep one optimizer per parameter in backward "
            "hooks, which checkpoints do not hold; start a new run, or train without *_layerwise to resume"
        )


def attach_layerwise_schedulers(optimizer: LayerwiseOptimizer, make_scheduler) -> None:
    """LF's create_custom_scheduler: one scheduler per parameter's optimizer, stepped after it in the hook."""
    schedulers = {param: make_scheduler(opt) for param, opt in optimizer.per_param.items()}

    def hook(param):
        schedulers[param].step()

    for param in schedulers:
        param.register_post_accumulate_grad_hook(hook)


# -- LoRA+ ------------------------------------------------------------------------------------------------------
def _loraplus(model, cfg):
    """LF's _create_loraplus_optimizer: A (and other matrices) at lr, B and 1-D weights at ratio × lr, LoRA's
    embedding B at loraplus_lr_embedding. `lr_scale` tells a resumed run how each group follows the learning rate."""
    f, t = cfg.finetuning, cfg.train
    names, lr = decay_parameter_names(model), t.learning_rate
    parts = {"a": [], "b": [], "b_nodecay": [], "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_B" in name:
            parts["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            parts["b" if name in names else "b_nodecay"].append(param)
        else:
            parts["a"].append(param)
    scales = {"a": 1.0, "b": f.loraplus_lr_ratio, "b_nodecay": f.loraplus_lr_ratio}
    scales["embedding"] = f.loraplus_lr_embedding / lr if lr else 0.0
    groups = [
        {"params": parts[key], "lr": lr * scales[key] if key != "embedding" else f.loraplus_lr_embedding}
        | {"weight_decay": 0.0 if key == "b_nodecay" else t.weight_decay, "lr_scale": scales[key]}
        for key in parts
        if parts[key]
    ]
    kwargs = _adam_kwargs(cfg)
    if t.optim in EIGHT_BIT:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if t.optim.startswith("paged") else bnb.optim.AdamW8bit
        return cls(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, foreach=True)


# -- BAdam -----------------------------------------------------------------------------------------------------
def _refuse_resume(optimizer, key: str):
    def load_state_dict(state_dict):
        raise UserError(
            f"resume_from_checkpoint: {key} keeps its active block and step count outside the optimizer state that "
            "checkpoints hold; start a new run to train with it"
        )

    optimizer.load_state_dict = load_state_dict
    return optimizer


def _badam(model, cfg):
    f, t = cfg.finetuning, cfg.train
    decay, no_decay = _split_decay(model)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": t.weight_decay}]
    named = list(model.named_parameters())
    if f.badam_mode == "layer":
        from badam import BlockOptimizer

        base = torch.optim.AdamW(groups, **_adam_kwargs(cfg), foreach=True)
        optimizer = BlockOptimizer(
            base_optimizer=base,
            named_parameters_list=named,
            block_prefix_list=None,
            switch_block_every=f.badam_switch_interval,
            start_block=f.badam_start_block,
            switch_mode=f.badam_switch_mode,
            verbose=f.badam_verbose,
        )
        return _refuse_resume(optimizer, "use_badam (badam_mode layer)")
    optimizer = _ratio_class()(
        param_groups=groups,
        named_parameters_list=named,
        update_ratio=f.badam_update_ratio,
        mask_mode=f.badam_mask_mode,
        verbose=f.badam_verbose,
        include_embedding=False,
        **_adam_kwargs(cfg),
    )
    return _refuse_resume(optimizer, "use_badam (badam_mode ratio)")


def _ratio_class():
    from badam import BlockOptimizerRatio

    class DenseUntilStep(BlockOptimizerRatio):
        """BAdam's ratio mode masks each gradient to a sparse tensor in its backward hook; here the masked gradient
        stays dense (same values, same norm) until `step`, so the strategy's gradient clipping, which cannot read
        sparse tensors, scales it as LF's sparse-aware clipping does."""

        def __init__(self, *args, **kwargs):
            self.masked: dict = {}
            super().__init__(*args, **kwargs)

        def sparse_update_hook(self):
            sparsify = super().sparse_update_hook()

            def hook(param):
                sparsify(param)
                sparse = param.grad.coalesce()
                self.masked[param] = sparse.indices()
                param.grad = sparse.to_dense()

            return hook

        @torch.no_grad()
        def step(self, closure=None):
            for param, index in self.masked.items():
                if param.grad is not None:
                    values = param.grad[tuple(index)]
                    param.grad = torch.sparse_coo_tensor(index, values, param.shape, is_coalesced=True)
            self.masked.clear()
            return super().step(closure)

    return DenseUntilStep


# -- Adam-mini -------------------------------------------------------------------------------------------------
def _adam_mini(model, cfg):
    from adam_mini import Adam_mini

    t, config = cfg.train, _hf_config(model)
    # ZeRO-3 / FSDP2 hold shards of whole parameters (LF's model_sharding: fsdp or ZeRO-3)
    sharded = any(hasattr(p, "ds_id") or hasattr(p, "_local_tensor") for p in model.parameters())
    return Adam_mini(
        named_parameters=model.named_parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
        model_sharding=sharded,
        dim=getattr(config, "hidden_size", None),
        n_heads=getattr(config, "num_attention_heads", None),
        n_kv_heads=getattr(config, "num_key_value_heads", None),
        verbose=False,
    )


# -- Muon ------------------------------------------------------------------------------------------------------
def muon_split(model) -> tuple[list, list]:
    """LF's rule: Muon for the 2-D weights that are not embeddings or the output layer, AdamW for the rest."""
    muon, adamw = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_muon = param.ndim == 2 and "embed" not in name and "lm_head" not in name
            (muon if is_muon else adamw).append(param)
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """LF's Muon as one optimizer: torch's Muon (Moonlight's lr adjustment, 0.2·sqrt(max(A, B)), which torch names
    "match_rms_adamw") for the hidden matrices and torch's AdamW for the rest, both at the run's lr and weight decay.
    Its param_groups are theirs (one scheduler drives both) and its state is theirs (one checkpoint)."""

    def __init__(self, muon: list, adamw: list, lr: float, weight_decay: float, betas, eps: float):
        self.parts = []
        if muon:
            self.parts.append(torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
        if adamw:
            self.parts.append(torch.optim.AdamW(adamw, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        super().__init__([g for part in self.parts for g in part.param_groups], {})
        self._share()

    def _share(self) -> None:
        """The parts step the groups and state this optimizer holds (again after load_state_dict replaced them)."""
        start = 0
        for part in self.parts:
            part.param_groups = self.param_groups[start : start + len(part.param_groups)]
            part.state = self.state
            start += len(part.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._share()


def _muon(model, cfg):
    t = cfg.train
    muon, adamw = muon_split(model)
    return MuonWithAdamW(muon, adamw, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
