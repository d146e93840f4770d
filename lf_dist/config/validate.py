"""Every check of a config's own values, in one place. Each failure is one UserError line naming the key.

What depends on the stage (which keys it reads, what packing means for it) is the stage's own check, run
right after these by `lf_dist.run_checks.load_config`; config/ itself knows no stage.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lf_dist.config.methods import check_methods
from lf_dist.config.schema import (
    EXPORT_DEVICES,
    FINETUNING_TYPES,
    FLASH_ATTN,
    GRPO_LOSS_TYPES,
    INFER_BACKENDS,
    INFER_DTYPES,
    LAUNCHERS,
    OPTIMIZERS,
    PLACEMENT_STRATEGIES,
    PREF_LOSSES,
    QUANTIZATION_BITS,
    QUANTIZATION_TYPES,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    REWARD_MODEL_TYPES,
    SCALE_REWARDS,
    SCHEDULERS,
    TRACKERS,
    RunConfig,
    is_hub_name,
)
from lf_dist.errors import UserError

EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UserError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; returns a copy with the defaults that depend on other keys filled in."""
    cfg = cfg.replace()
    _validate_choices(cfg)
    _validate_required(cfg)
    _validate_numbers(cfg)
    if cfg.train.optim not in OPTIMIZERS:
        cfg.ignored["optim"] = f"{cfg.train.optim} (lf-dist uses torch AdamW)"
    _validate_quantization(cfg)
    _validate_launch(cfg)
    _validate_trackers(cfg)
    _validate_generation(cfg)
    _validate_export(cfg)
    if cfg.finetuning.lora_alpha is None:
        cfg.finetuning.lora_alpha = 2 * cfg.finetuning.lora_rank
    _validate_data(cfg)
    _validate_preference(cfg)
    _validate_online_rl(cfg)
    _validate_model_parallel(cfg)
    _validate_checkpointing_and_resume(cfg)
    check_methods(cfg)
    return cfg


def _validate_choices(cfg: RunConfig) -> None:
    training_args = cfg.train
    _choice("finetuning_type", cfg.finetuning.finetuning_type, FINETUNING_TYPES)
    _choice("flash_attn", cfg.model.flash_attn, FLASH_ATTN)
    _choice("lr_scheduler_type", training_args.lr_scheduler_type, SCHEDULERS)
    _choice("eval_strategy", training_args.eval_strategy, EVAL_STRATEGIES)
    _choice("save_strategy", training_args.save_strategy, SAVE_STRATEGIES)
    _choice("logging_strategy", training_args.logging_strategy, EVAL_STRATEGIES)
    if isinstance(training_args.deepspeed, str) and not Path(training_args.deepspeed).is_file():
        raise UserError(f"deepspeed: config file not found: {training_args.deepspeed}")


def _validate_required(cfg: RunConfig) -> None:
    data_args, training_args = cfg.data, cfg.train
    if training_args.do_predict and "do_train" not in cfg.given:
        training_args.do_train = False  # Hugging Face's default: a prediction config trains only when it says so
    if not cfg.model.model_name_or_path:
        raise UserError("model_name_or_path: required (a Hugging Face checkpoint folder, or a hub name: org/model)")
    if cfg.command != "train":
        return
    if training_args.do_train and not data_args.dataset:
        raise UserError("dataset: required for training (one or more names from dataset_info.json, comma-separated)")
    if not training_args.do_train and not data_args.eval_dataset and not (data_args.dataset and data_args.val_size):
        if training_args.do_predict:
            raise UserError("do_predict: needs eval_dataset (or dataset with val_size): the examples to answer")
        raise UserError(
            "do_train: false leaves only evaluation, and there is nothing to evaluate; set eval_dataset (or "
            "dataset with val_size)"
        )
    if not training_args.output_dir:
        raise UserError("output_dir: required")


def _validate_numbers(cfg: RunConfig) -> None:
    data_args, finetuning_args, training_args = cfg.data, cfg.finetuning, cfg.train
    _positive("fsdp_shard_size", training_args.fsdp_shard_size)
    if data_args.cutoff_len <= 0:
        raise UserError(f"cutoff_len: must be > 0, got {data_args.cutoff_len}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _positive(key, getattr(training_args, key))
    for key in ("learning_rate", "logging_steps", "save_steps", "lora_rank"):
        _positive(key, getattr(training_args, key, getattr(finetuning_args, key, None)))
    for key in ("weight_decay", "max_grad_norm", "warmup_steps", "adam_epsilon", "num_train_epochs"):
        _positive(key, getattr(training_args, key), allow_zero=True)
    _positive("lora_dropout", finetuning_args.lora_dropout, allow_zero=True)
    _positive("max_samples", data_args.max_samples)
    _positive("save_total_limit", training_args.save_total_limit)
    _positive("max_nonfinite_steps", training_args.max_nonfinite_steps)
    _positive("preprocessing_num_workers", data_args.preprocessing_num_workers)
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UserError("num_train_epochs: must be > 0 when max_steps is not set")
    if not 0.0 <= training_args.warmup_ratio < 1.0:
        raise UserError(f"warmup_ratio: must be in [0, 1), got {training_args.warmup_ratio}")
    val_size = data_args.val_size
    if not 0.0 <= val_size < 1.0 and not (val_size >= 1 and float(val_size).is_integer()):
        raise UserError(f"val_size: a fraction in [0, 1) or a whole number of examples, got {val_size}")
    if not (0.0 <= training_args.adam_beta1 < 1.0 and 0.0 <= training_args.adam_beta2 < 1.0):
        raise UserError("adam_beta1/adam_beta2: must be in [0, 1)")
    if training_args.bf16 and training_args.fp16:
        raise UserError("bf16 and fp16: choose one")
    if training_args.eval_strategy == "steps" and training_args.eval_steps is not None:
        _positive("eval_steps", training_args.eval_steps)


def _validate_trackers(cfg: RunConfig) -> None:
    training_args = cfg.train
    if cfg.command == "train":
        training_args.report_to = _trackers(training_args.report_to)
        if training_args.logging_dir and "tensorboard" not in training_args.report_to:
            cfg.ignored["logging_dir"] = f"{training_args.logging_dir} (only report_to: tensorboard writes there)"


def _validate_checkpointing_and_resume(cfg: RunConfig) -> None:
    training_args = cfg.train
    if cfg.finetuning.disable_gradient_checkpointing is False and training_args.gradient_checkpointing is False:
        cfg.finetuning.disable_gradient_checkpointing = True
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        training_args.resume_from_checkpoint = resume = resume.lower() == "true"
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise UserError(f"resume_from_checkpoint: no checkpoint directory at {resume}")


def _trackers(report_to) -> list[str]:
    """`report_to` as a list of implemented trackers, each installed (LLaMA-Factory and HF accept a string, a
    comma-separated string or a list; "all" is every tracker that is installed, "none" none)."""
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to or [])
    names = [str(n).strip() for n in names if str(n).strip() not in ("none", "None", "")]
    if names == ["all"]:
        return [n for n in TRACKERS if importlib.util.find_spec(n) is not None]
    for name in names:
        if name not in TRACKERS:
            raise UserError(
                f"report_to: '{name}' is not a tracker lf-dist implements (available: "
                f"{', '.join(TRACKERS)}, all, none)"
            )
        if importlib.util.find_spec(name) is None:
            raise UserError(f"report_to: {name} is not installed (pip install 'lf-dist[{name}]')")
    return list(dict.fromkeys(names))


def _validate_generation(cfg: RunConfig) -> None:
    generating_args = cfg.generation
    if generating_args.infer_backend in ("vllm", "sglang", "ktransformers"):
        raise UserError(
            f"infer_backend: '{generating_args.infer_backend}' is not implemented by lf-dist (available: huggingface)"
        )
    _choice("infer_backend", generating_args.infer_backend, INFER_BACKENDS)
    _choice("infer_dtype", generating_args.infer_dtype, INFER_DTYPES)
    _positive("temperature", generating_args.temperature, allow_zero=True)
    if not 0.0 < generating_args.top_p <= 1.0:
        raise UserError(f"top_p: must be in (0, 1], got {generating_args.top_p}")
    _positive("top_k", generating_args.top_k, allow_zero=True)
    for key in ("max_new_tokens", "max_length", "repetition_penalty"):
        _positive(key, getattr(generating_args, key))
    if generating_args.num_beams != 1 and cfg.command in ("chat", "api"):
        raise UserError(
            f"num_beams: lf-dist {cfg.command} streams one sequence (num_beams 1), got {generating_args.num_beams}"
        )


def _validate_export(cfg: RunConfig) -> None:
    export_args = cfg.export
    _choice("export_device", export_args.export_device, EXPORT_DEVICES)
    _positive("export_size", export_args.export_size)
    if cfg.command != "export":
        return
    if not export_args.export_dir:
        raise UserError("export_dir: required (the folder the merged Hugging Face model is written to)")
    if export_args.export_hub_model_id:
        raise UserError("export_hub_model_id: lf-dist does not upload to a hub; push export_dir yourself")
    if export_args.export_quantization_bit is not None:
        raise UserError("export_quantization_bit: GPTQ export is not implemented by lf-dist; export unquantized")


def _as_dict(key: str, value):
    """A dict, or a JSON object in a string (LLaMA-Factory accepts both for its dict-valued ray keys)."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise UserError(f"{key}: not a JSON object ({err.msg} at position {err.pos}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{key}: expected a mapping, got {value!r}")
    return parsed


def _validate_launch(cfg: RunConfig) -> None:
    launch_args = cfg.launch
    _choice("launcher", launch_args.launcher, LAUNCHERS)
    launch_args.placement_strategy = str(launch_args.placement_strategy).upper()
    _choice("placement_strategy", launch_args.placement_strategy, PLACEMENT_STRATEGIES)
    _positive("ray_num_workers", launch_args.ray_num_workers)
    _positive("ray_max_failures", launch_args.ray_max_failures, allow_zero=True)
    launch_args.ray_init_kwargs = _as_dict("ray_init_kwargs", launch_args.ray_init_kwargs)
    launch_args.resources_per_worker = _as_dict("resources_per_worker", launch_args.resources_per_worker)
    for name, amount in (launch_args.resources_per_worker or {}).items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
            raise UserError(f"resources_per_worker: {name} must be a number >= 0, got {amount!r}")


def _validate_quantization(cfg: RunConfig) -> None:
    model_args, finetuning_args = cfg.model, cfg.finetuning
    if model_args.quantization_method != "bnb":
        raise UserError(
            f"quantization_method: '{model_args.quantization_method}' is not implemented by lf-dist (available: bnb)"
        )
    if model_args.quantization_bit is not None:
        _choice("quantization_bit", model_args.quantization_bit, QUANTIZATION_BITS)
        if finetuning_args.finetuning_type in ("full", "freeze"):
            raise UserError(
                f"quantization_bit: a quantized base trains only adapters; use finetuning_type lora, not "
                f"{finetuning_args.finetuning_type}"
            )
    _choice("quantization_type", model_args.quantization_type, QUANTIZATION_TYPES)


def _validate_data(cfg: RunConfig) -> None:
    data_args = cfg.data
    _choice(
        "mix_strategy", data_args.mix_strategy, ("concat", "interleave_under", "interleave_over", "interleave_once")
    )
    if data_args.interleave_probs is not None:
        if data_args.mix_strategy == "concat":
            raise UserError("interleave_probs: only valid with an interleave_* mix_strategy")
        probs = [p.strip() for p in str(data_args.interleave_probs).split(",")]
        if data_args.dataset and len(probs) != len(data_args.dataset.split(",")):
            raise UserError("interleave_probs: give one probability per dataset")
    if data_args.eval_dataset and data_args.val_size > 1e-6:
        raise UserError("val_size: cannot be set together with eval_dataset")
    if data_args.mask_history and data_args.train_on_prompt:
        raise UserError("mask_history: incompatible with train_on_prompt")
    if data_args.neat_packing:
        data_args.packing = True  # as LLaMA-Factory: neat packing is a kind of packing


def _validate_preference(cfg: RunConfig) -> None:
    """The preference keys' values are checked whatever the stage, so a typo never waits for the stage
    that reads it."""
    finetuning_args = cfg.finetuning
    if finetuning_args.pref_loss in ("kto_pair", "bco"):
        raise UserError(
            f"pref_loss: '{finetuning_args.pref_loss}' is not implemented by lf-dist "
            f"(available: {', '.join(PREF_LOSSES)})"
        )
    _choice("pref_loss", finetuning_args.pref_loss, PREF_LOSSES)
    _positive("pref_beta", finetuning_args.pref_beta)
    for key in ("pref_ftx", "simpo_gamma", "kto_chosen_weight", "kto_rejected_weight"):
        _positive(key, getattr(finetuning_args, key), allow_zero=True)
    if not 0.0 <= finetuning_args.dpo_label_smoothing < 0.5:
        raise UserError(f"dpo_label_smoothing: must be in [0, 0.5), got {finetuning_args.dpo_label_smoothing}")
    if (
        finetuning_args.ref_model is not None
        and not is_hub_name(finetuning_args.ref_model)
        and not (Path(finetuning_args.ref_model) / "config.json").is_file()
    ):
        raise UserError(
            f"ref_model: {finetuning_args.ref_model} is not a Hugging Face checkpoint folder (no config.json) "
            "or hub name"
        )


def _validate_online_rl(cfg: RunConfig) -> None:
    """ppo's and grpo's keys, checked whatever the stage (what a stage requires is its own check)."""
    finetuning_args = cfg.finetuning
    if finetuning_args.reward_model_type == "api":
        raise UserError("reward_model_type: 'api' is not implemented by lf-dist (available: lora, full)")
    _choice("reward_model_type", finetuning_args.reward_model_type, REWARD_MODEL_TYPES)
    if finetuning_args.reward_model_quantization_bit is not None:
        raise UserError("reward_model_quantization_bit: not implemented by lf-dist yet; remove it to continue")
    _choice("loss_type", finetuning_args.loss_type, GRPO_LOSS_TYPES)
    if isinstance(finetuning_args.scale_rewards, bool):  # TRL's older spelling: true is "group", false "none"
        finetuning_args.scale_rewards = "group" if finetuning_args.scale_rewards else "none"
    _choice("scale_rewards", finetuning_args.scale_rewards, SCALE_REWARDS)
    for key in ("ppo_epochs", "ppo_buffer_size", "num_iterations", "ppo_target", "epsilon"):
        _positive(key, getattr(finetuning_args, key))
    _positive("beta", finetuning_args.beta, allow_zero=True)
    _positive("epsilon_high", finetuning_args.epsilon_high)
    if finetuning_args.num_generations < 2:
        raise UserError(
            f"num_generations: must be at least 2 (a group's rewards are compared), got "
            f"{finetuning_args.num_generations}"
        )
    funcs = finetuning_args.reward_funcs
    if isinstance(funcs, str):
        funcs = [f.strip() for f in funcs.split(",") if f.strip()]
    if funcs is not None and not all(isinstance(f, str) for f in funcs):
        raise UserError(f"reward_funcs: expected 'path.py:function' entries, got {finetuning_args.reward_funcs!r}")
    finetuning_args.reward_funcs = funcs or None
    weights = finetuning_args.reward_weights
    if weights is not None and not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise UserError(f"reward_weights: expected a list of numbers, got {weights!r}")  # counted by the stage


def _validate_model_parallel(cfg: RunConfig) -> None:
    """megatron's parallel sizes and recompute settings, as values (the world size and the model are checked
    against them when the run is planned)."""
    training_args = cfg.train
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        _positive(key, getattr(training_args, key))
    _positive("virtual_pipeline_model_parallel_size", training_args.virtual_pipeline_model_parallel_size)
    _positive("recompute_num_layers", training_args.recompute_num_layers)
    vpp = training_args.virtual_pipeline_model_parallel_size
    if vpp and vpp > 1 and training_args.pipeline_model_parallel_size < 2:
        raise UserError(
            "virtual_pipeline_model_parallel_size: interleaves pipeline stages; set pipeline_model_parallel_size >= 2"
        )
    if training_args.recompute_granularity is not None:
        _choice("recompute_granularity", training_args.recompute_granularity, RECOMPUTE_GRANULARITIES)
    if training_args.recompute_method is not None:
        _choice("recompute_method", training_args.recompute_method, RECOMPUTE_METHODS)
    full = training_args.recompute_granularity == "full"
    if (training_args.recompute_method or training_args.recompute_num_layers) and not full:
        raise UserError(
            "recompute_method / recompute_num_layers: apply to recompute_granularity: full; set it, or drop them"
        )
    if full and not (training_args.recompute_method and training_args.recompute_num_layers):
        raise UserError(
            "recompute_granularity: full needs recompute_method (uniform or block) and recompute_num_layers, as "
            "in megatron-core"
        )
