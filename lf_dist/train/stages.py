"""The stage registry: everything that differs between pt, sft, rm, dpo and kto, one spec per stage.

A spec names its data kind (how records become rows, how they pack and collate), its model head, the frozen
models it reads, its loss and the metrics it shows, the work it does before each update (`prepare`: reference
log-probs, rollouts), how many rows the loader draws per micro-batch and step, and its config rules. Adding a
stage is adding one spec here; no other module compares a stage's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lf_dist.config import RunConfig
from lf_dist.config.schema import ADAPTER_TYPES
from lf_dist.data.kinds import FEEDBACK, PAIRWISE, PROMPT, SUPERVISED, TEXT, DataKind
from lf_dist.errors import UserError
from lf_dist.model.heads import CAUSAL_LM, CAUSAL_LM_VALUE, SEQUENCE_SCORE, Head
from lf_dist.train.grpo import GRPO_SAMPLING, GRPOLoss, grpo_prepare
from lf_dist.train.losses import CausalLMLoss, StageLoss, StepContext, one_step
from lf_dist.train.online_rl import sampling_of
from lf_dist.train.ppo import PPOLoss, ppo_prepare
from lf_dist.train.pref_losses import REFERENCE_LOSSES
from lf_dist.train.preference import DPOLoss, KTOLoss, RewardLoss, reference_columns
from lf_dist.train.sft_losses import sft_loss


@dataclass(frozen=True)
class FrozenModel:
    """A model the stage reads but never trains; the strategy places it like the policy.
    `path` None: the policy itself with its LoRA adapters disabled (no second copy)."""

    role: str
    path: str | None
    head: Head = CAUSAL_LM
    # (config, tokenizer, dtype, meta) → the model, where a path and head do not say how to build it (a reward
    # model made of adapters and a value head)
    build: Callable | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    data: DataKind
    head: Head
    # (config, frozen models by role: `Frozen` handles) → the loss the loop calls
    build_loss: Callable[[RunConfig, dict], StageLoss]
    # the frozen models this config of the stage needs
    frozen: Callable[[RunConfig], tuple[FrozenModel, ...]] = lambda cfg: ()
    # (context, the loader's micro-batches of one step) → the micro-batches of one or more optimizer steps, with
    # the columns the loss reads (reference log-probs; generated and scored completions), before `train_step`
    prepare: Callable[[StepContext, list[dict]], list[list[dict]]] = one_step
    # (config) → (rows per micro-batch, micro-batches per step) the loader draws on each rank
    loader_shape: Callable[[RunConfig], tuple[int, int]] = lambda cfg: (
        cfg.train.per_device_train_batch_size,
        cfg.train.gradient_accumulation_steps,
    )
    # the stage's own config rules (after the shared ones): a checked copy of the config, or a UserError
    check: Callable[[RunConfig], RunConfig] = lambda cfg: cfg
    # a rollout stage: (config) → the new tokens it generates per row (the planner counts them); None otherwise
    generates: Callable[[RunConfig], int] | None = None
    packing_default: bool = False  # packing when the config leaves it unset
    # the loss is the label tokens' cross-entropy (CausalLMLoss): a backend may compute their log-probs its own
    # way (megatron: vocab-parallel) and hand them to the loss
    token_loss: bool = False
    neat_packing: bool = False  # examples in a packed row can be kept from seeing each other
    prompt_masking: bool = False  # train_on_prompt / mask_history apply
    token_losses: bool = False  # LLaMA-Factory's token losses (use_dft_loss, use_asft_loss, use_eaft_loss) apply
    predicts: bool = False  # do_predict: generate answers for the eval set and score them (BLEU, ROUGE)


def _reference(cfg: RunConfig) -> tuple[FrozenModel, ...]:
    """dpo's reference losses and kto: LoRA's own base with adapters disabled unless `ref_model` is set, else a
    frozen copy of `ref_model` or of the starting checkpoint."""
    finetuning_args = cfg.finetuning
    if finetuning_args.finetuning_type in ADAPTER_TYPES and finetuning_args.ref_model is None:
        return (FrozenModel("reference", None),)
    return (FrozenModel("reference", finetuning_args.ref_model or cfg.model.model_name_or_path),)


def _dpo_reference(cfg: RunConfig) -> tuple[FrozenModel, ...]:
    return _reference(cfg) if cfg.finetuning.pref_loss in REFERENCE_LOSSES else ()


def _grpo_reference(cfg: RunConfig) -> tuple[FrozenModel, ...]:
    return _reference(cfg) if cfg.finetuning.beta != 0.0 else ()


def _prompts_per_batch(cfg: RunConfig) -> tuple[int, int]:
    """grpo's per-device batch counts completions: its prompts are that over num_generations."""
    return (
        cfg.train.per_device_train_batch_size // cfg.finetuning.num_generations,
        cfg.train.gradient_accumulation_steps,
    )


# generation keys a rollout does not read (it samples one sequence per draw, up to max_new_tokens)
_UNREAD_GENERATION_KEYS = ("length_penalty", "max_length", "skip_special_tokens", "infer_backend", "infer_dtype")


def _check_rollouts(cfg: RunConfig) -> None:
    """What every rollout stage refuses (an eval set: no eval is defined for them yet; beam search) or reports as
    changing nothing (the chat-only generation keys); the reward_weights left to count against the functions."""
    f, data_args, gen = cfg.finetuning, cfg.data, cfg.generation
    if data_args.eval_dataset or data_args.val_size > 1e-6:
        raise UserError(
            f"eval_dataset / val_size: stage {f.stage} has no evaluation yet (it would be the mean reward on eval "
            "prompts); remove them to continue"
        )
    if gen.num_beams != 1:
        raise UserError(f"num_beams: stage {f.stage} samples its completions (num_beams 1), got {gen.num_beams}")
    for key in _UNREAD_GENERATION_KEYS:
        if key in cfg.given:
            cfg.ignored[key] = getattr(gen, key)
    if f.reward_weights is not None and len(f.reward_weights) != len(f.reward_funcs or ()):
        raise UserError(
            f"reward_weights: {len(f.reward_weights)} weights for {len(f.reward_funcs or ())} reward_funcs; give one "
            "per function"
        )


def _ppo_frozen(cfg: RunConfig) -> tuple[FrozenModel, ...]:
    """The reference, and ppo's reward model (ppo_custom scores with functions)."""
    if cfg.finetuning.stage != "ppo":
        return _reference(cfg)
    from lf_dist.train.reward_model import build_reward_model

    reward = FrozenModel("reward", cfg.finetuning.reward_model, SEQUENCE_SCORE, build=build_reward_model)
    return (*_reference(cfg), reward)


def _ppo_loader(cfg: RunConfig) -> tuple[int, int]:
    """A ppo step's rollout: per-device batch × accumulation × ppo_buffer_size prompts per rank."""
    train_args = cfg.train
    return (
        train_args.per_device_train_batch_size,
        train_args.gradient_accumulation_steps * cfg.finetuning.ppo_buffer_size,
    )


def _check_ppo(cfg: RunConfig) -> RunConfig:
    if cfg.finetuning.stage == "ppo":
        from lf_dist.train.reward_model import check_reward_model

        if cfg.finetuning.reward_funcs:
            raise UserError(
                "reward_funcs: stage ppo scores with its reward_model; for reward functions use ppo_custom"
            )
        check_reward_model(cfg)
    else:
        from lf_dist.train.rewards import PPO_CUSTOM_DEFAULT, load_reward_functions

        if cfg.finetuning.reward_model:
            raise UserError("reward_model: stage ppo_custom scores with reward_funcs; for a reward model use ppo")
        if not cfg.finetuning.reward_funcs:  # the fork's default file, relative to the working directory
            cfg = cfg.replace(finetuning={"reward_funcs": [PPO_CUSTOM_DEFAULT]})
        load_reward_functions(cfg.finetuning.reward_funcs)
    _check_rollouts(cfg)
    return cfg


def _check_grpo(cfg: RunConfig) -> RunConfig:
    from lf_dist.train.rewards import load_reward_functions

    _check_rollouts(cfg)
    f, batch, gen = cfg.finetuning, cfg.train.per_device_train_batch_size, cfg.generation
    if not gen.do_sample or ("temperature" in cfg.given and gen.temperature <= 0):
        raise UserError(
            "do_sample / temperature: grpo samples each group (a greedy group's completions are identical and teach "
            "nothing); use do_sample: true and temperature > 0"
        )
    if batch % f.num_generations:
        raise UserError(
            f"per_device_train_batch_size: {batch} completions per device do not divide into groups of "
            f"num_generations {f.num_generations} (a prompt's group stays on one rank); use a multiple of "
            f"{f.num_generations}"
        )
    if not f.reward_funcs:
        raise UserError("reward_funcs: stage grpo needs at least one reward function (path.py:function)")
    if f.reward_model:
        raise UserError(
            "reward_model: stage grpo scores with reward_funcs (a reward model for grpo is not implemented)"
        )
    load_reward_functions(f.reward_funcs)  # a missing file or function, or a wrong signature: one line now
    return cfg


def _dpo(cfg: RunConfig, frozen: dict) -> DPOLoss:
    finetuning_args = cfg.finetuning
    return DPOLoss(
        finetuning_args.pref_loss,
        finetuning_args.pref_beta,
        finetuning_args.pref_ftx,
        finetuning_args.dpo_label_smoothing,
        finetuning_args.simpo_gamma,
        frozen.get("reference"),
    )


def _kto(cfg: RunConfig, frozen: dict) -> KTOLoss:
    finetuning_args = cfg.finetuning
    return KTOLoss(
        finetuning_args.pref_beta,
        finetuning_args.pref_ftx,
        finetuning_args.kto_chosen_weight,
        finetuning_args.kto_rejected_weight,
        frozen["reference"],
    )


STAGES = {
    spec.name: spec
    for spec in (
        StageSpec("pt", TEXT, CAUSAL_LM, lambda cfg, frozen: CausalLMLoss(), packing_default=True, token_loss=True),
        StageSpec(
            "sft",
            SUPERVISED,
            CAUSAL_LM,
            sft_loss,
            frozen=lambda cfg: _reference(cfg) if cfg.finetuning.use_asft_loss else (),
            token_losses=True,
            predicts=True,
            neat_packing=True,
            prompt_masking=True,
            token_loss=True,
        ),
        StageSpec("rm", PAIRWISE, SEQUENCE_SCORE, lambda cfg, frozen: RewardLoss(), neat_packing=True),
        StageSpec(
            "dpo", PAIRWISE, CAUSAL_LM, _dpo, frozen=_dpo_reference, prepare=reference_columns, neat_packing=True
        ),
        StageSpec("kto", FEEDBACK, CAUSAL_LM, _kto, frozen=_reference, prepare=reference_columns),
        StageSpec(
            "grpo",
            PROMPT,
            CAUSAL_LM,
            GRPOLoss,
            frozen=_grpo_reference,
            prepare=grpo_prepare,
            loader_shape=_prompts_per_batch,
            check=_check_grpo,
            generates=lambda cfg: sampling_of(cfg, GRPO_SAMPLING).max_new_tokens,
        ),
        *(
            StageSpec(
                name,
                PROMPT,
                CAUSAL_LM_VALUE,
                PPOLoss,
                frozen=_ppo_frozen,
                prepare=ppo_prepare,
                loader_shape=_ppo_loader,
                check=_check_ppo,
                generates=lambda cfg: cfg.generation.max_new_tokens,
            )
            for name in ("ppo", "ppo_custom")
        ),
    )
}
NOT_IMPLEMENTED = ()  # LLaMA-Factory stages lf-dist does not run yet


def get_stage(name: str) -> StageSpec:
    if name in STAGES:
        return STAGES[name]
    available = ", ".join(STAGES)
    if name in NOT_IMPLEMENTED:
        raise UserError(f"stage: '{name}' is not implemented by lf-dist yet (available: {available})")
    raise UserError(f"stage: '{name}' is not one of {available}")


def _stages_where(rule) -> str:
    return ", ".join(name for name, spec in STAGES.items() if rule(spec))


def check_stage_config(cfg: RunConfig) -> RunConfig:
    """The config rules that depend on the stage, read off its spec; a copy with its defaults filled in."""
    spec, data_args = get_stage(cfg.finetuning.stage), cfg.data
    if (data_args.train_on_prompt or data_args.mask_history) and not spec.prompt_masking:
        raise UserError(f"train_on_prompt / mask_history: only for stage {_stages_where(lambda s: s.prompt_masking)}")
    if data_args.neat_packing and not spec.neat_packing:
        raise UserError(f"neat_packing: only for stages {_stages_where(lambda s: s.neat_packing)}")
    if data_args.packing is None:
        cfg = cfg.replace(data={"packing": spec.packing_default})
        data_args = cfg.data
    _check_methods_of_stage(cfg, spec)
    if data_args.packing and not spec.data.packs:
        where = _stages_where(lambda s: s.data.packs and not s.packing_default)
        raise UserError(f"packing: not supported for stage {spec.name} (rows pack for {where})")
    return spec.check(cfg)


def _check_methods_of_stage(cfg: RunConfig, spec: StageSpec) -> None:
    """LLaMA-Factory's method keys that only some stages read."""
    f = cfg.finetuning
    chosen = next((k for k in ("use_dft_loss", "use_asft_loss", "use_eaft_loss") if getattr(f, k)), None)
    if chosen and not spec.token_losses:
        raise UserError(f"{chosen}: only for stage {_stages_where(lambda s: s.token_losses)}")
    if cfg.train.do_predict and not spec.predicts:
        raise UserError(f"do_predict: generating predictions is for stage {_stages_where(lambda s: s.predicts)}")
    if cfg.train.do_predict:  # prediction reads max_new_tokens (as LLaMA-Factory does) and generates in-process
        cfg.ignored.update(
            {k: getattr(cfg.generation, k) for k in ("max_length", "infer_backend", "infer_dtype") if k in cfg.given}
        )
    if f.pissa_init and any(m.path is None for m in spec.frozen(cfg)):
        # the adapters-off base of a PiSSA model is the residual, not the model the run started from
        raise UserError(
            f"pissa_init: stage {spec.name} uses the base with adapters off as its reference; set ref_model"
        )


def build_loss(cfg: RunConfig, frozen: dict | None = None) -> StageLoss:
    """The loss of the config's stage; `frozen` holds the `Frozen` handles of the models its spec asks for."""
    return get_stage(cfg.finetuning.stage).build_loss(cfg, frozen or {})
