"""Every check of a config's own values, in one place. Each failure is one UserError line naming the key.

What depends on the stage (which keys it reads, what packing means for it) is the stage's own check, run
right after these by `lf_dist.configure.load_config`; config/ itself knows no stage.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lf_dist.config.schema import (
    EXPORT_DEVICES,
    FINETUNING_TYPES,
    FLASH_ATTN,
    INFER_BACKENDS,
    INFER_DTYPES,
    LAUNCHERS,
    OPTIMIZERS,
    PLACEMENT_STRATEGIES,
    PREF_LOSSES,
    QUANTIZATION_BITS,
    QUANTIZATION_TYPES,
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


def validate(cfg: RunConfig) -> None:
    m, d, f, t = cfg.model, cfg.data, cfg.finetuning, cfg.train
    _choice("finetuning_type", f.finetuning_type, FINETUNING_TYPES)
    _choice("flash_attn", m.flash_attn, FLASH_ATTN)
    _choice("lr_scheduler_type", t.lr_scheduler_type, SCHEDULERS)
    _choice("eval_strategy", t.eval_strategy, EVAL_STRATEGIES)
    _choice("save_strategy", t.save_strategy, SAVE_STRATEGIES)
    _choice("logging_strategy", t.logging_strategy, EVAL_STRATEGIES)
    _choice("strategy", t.strategy, ("auto", "single", "ddp", "fsdp2", "deepspeed"))
    if t.deepspeed and t.strategy not in ("auto", "deepspeed"):
        raise UserError(f"deepspeed: a DeepSpeed config is set but strategy is '{t.strategy}'; drop one of them")
    if isinstance(t.deepspeed, str) and not Path(t.deepspeed).is_file():
        raise UserError(f"deepspeed: config file not found: {t.deepspeed}")
    _positive("fsdp_shard_size", t.fsdp_shard_size)
    if not m.model_name_or_path:
        raise UserError("model_name_or_path: required (a Hugging Face checkpoint folder, or a hub name: org/model)")
    if cfg.command == "train":
        if t.do_train and not d.dataset:
            raise UserError(
                "dataset: required for training (one or more names from dataset_info.json, comma-separated)"
            )
        if not t.do_train and not d.eval_dataset and not (d.dataset and d.val_size):
            raise UserError(
                "do_train: false leaves only evaluation, and there is nothing to evaluate; set eval_dataset (or "
                "dataset with val_size)"
            )
        if not t.output_dir:
            raise UserError("output_dir: required")
    if d.cutoff_len <= 0:
        raise UserError(f"cutoff_len: must be > 0, got {d.cutoff_len}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _positive(key, getattr(t, key))
    for key in ("learning_rate", "logging_steps", "save_steps", "lora_rank"):
        _positive(key, getattr(t, key, getattr(f, key, None)))
    for key in ("weight_decay", "max_grad_norm", "warmup_steps", "adam_epsilon", "num_train_epochs"):
        _positive(key, getattr(t, key), allow_zero=True)
    _positive("lora_dropout", f.lora_dropout, allow_zero=True)
    _positive("max_samples", d.max_samples)
    _positive("save_total_limit", t.save_total_limit)
    _positive("max_nonfinite_steps", t.max_nonfinite_steps)
    _positive("preprocessing_num_workers", d.preprocessing_num_workers)
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise UserError("num_train_epochs: must be > 0 when max_steps is not set")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise UserError(f"warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if not 0.0 <= d.val_size < 1.0 and not (d.val_size >= 1 and float(d.val_size).is_integer()):
        raise UserError(f"val_size: a fraction in [0, 1) or a whole number of examples, got {d.val_size}")
    if not (0.0 <= t.adam_beta1 < 1.0 and 0.0 <= t.adam_beta2 < 1.0):
        raise UserError("adam_beta1/adam_beta2: must be in [0, 1)")
    if t.bf16 and t.fp16:
        raise UserError("bf16 and fp16: choose one")
    if t.eval_strategy == "steps" and t.eval_steps is not None:
        _positive("eval_steps", t.eval_steps)
    if t.optim not in OPTIMIZERS:
        cfg.ignored["optim"] = f"{t.optim} (lf-dist uses torch AdamW)"
    _validate_quantization(cfg)
    _validate_launch(cfg)
    if cfg.command == "train":
        t.report_to = _trackers(t.report_to)
        if t.logging_dir and "tensorboard" not in t.report_to:
            cfg.ignored["logging_dir"] = f"{t.logging_dir} (only report_to: tensorboard writes there)"
    _validate_generation(cfg)
    _validate_export(cfg)
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
    _validate_data(cfg)
    _validate_preference(cfg)
    if f.disable_gradient_checkpointing is False and t.gradient_checkpointing is False:
        f.disable_gradient_checkpointing = True
    if isinstance(t.resume_from_checkpoint, str) and t.resume_from_checkpoint.lower() in ("true", "false"):
        t.resume_from_checkpoint = t.resume_from_checkpoint.lower() == "true"
    if isinstance(t.resume_from_checkpoint, str) and not Path(t.resume_from_checkpoint).is_dir():
        raise UserError(f"resume_from_checkpoint: no checkpoint directory at {t.resume_from_checkpoint}")


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
    g = cfg.generation
    if g.infer_backend in ("vllm", "sglang", "ktransformers"):
        raise UserError(f"infer_backend: '{g.infer_backend}' is not implemented by lf-dist (available: huggingface)")
    _choice("infer_backend", g.infer_backend, INFER_BACKENDS)
    _choice("infer_dtype", g.infer_dtype, INFER_DTYPES)
    _positive("temperature", g.temperature, allow_zero=True)
    if not 0.0 < g.top_p <= 1.0:
        raise UserError(f"top_p: must be in (0, 1], got {g.top_p}")
    _positive("top_k", g.top_k, allow_zero=True)
    for key in ("max_new_tokens", "max_length", "repetition_penalty"):
        _positive(key, getattr(g, key))
    if g.num_beams != 1 and cfg.command in ("chat", "api"):
        raise UserError(f"num_beams: lf-dist {cfg.command} streams one sequence (num_beams 1), got {g.num_beams}")


def _validate_export(cfg: RunConfig) -> None:
    e = cfg.export
    _choice("export_device", e.export_device, EXPORT_DEVICES)
    _positive("export_size", e.export_size)
    if cfg.command != "export":
        return
    if not e.export_dir:
        raise UserError("export_dir: required (the folder the merged Hugging Face model is written to)")
    if e.export_hub_model_id:
        raise UserError("export_hub_model_id: lf-dist does not upload to a hub; push export_dir yourself")
    if e.export_quantization_bit is not None:
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
    la = cfg.launch
    _choice("launcher", la.launcher, LAUNCHERS)
    la.placement_strategy = str(la.placement_strategy).upper()
    _choice("placement_strategy", la.placement_strategy, PLACEMENT_STRATEGIES)
    _positive("ray_num_workers", la.ray_num_workers)
    _positive("ray_max_failures", la.ray_max_failures, allow_zero=True)
    la.ray_init_kwargs = _as_dict("ray_init_kwargs", la.ray_init_kwargs)
    la.resources_per_worker = _as_dict("resources_per_worker", la.resources_per_worker)
    for name, amount in (la.resources_per_worker or {}).items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
            raise UserError(f"resources_per_worker: {name} must be a number >= 0, got {amount!r}")


def _validate_quantization(cfg: RunConfig) -> None:
    m, f = cfg.model, cfg.finetuning
    if m.quantization_method != "bnb":
        raise UserError(
            f"quantization_method: '{m.quantization_method}' is not implemented by lf-dist (available: bnb)"
        )
    if m.quantization_bit is not None:
        _choice("quantization_bit", m.quantization_bit, QUANTIZATION_BITS)
        if f.finetuning_type in ("full", "freeze"):
            raise UserError(
                f"quantization_bit: a quantized base trains only adapters; use finetuning_type lora, not "
                f"{f.finetuning_type}"
            )
    _choice("quantization_type", m.quantization_type, QUANTIZATION_TYPES)


def _validate_data(cfg: RunConfig) -> None:
    d = cfg.data
    _choice("mix_strategy", d.mix_strategy, ("concat", "interleave_under", "interleave_over", "interleave_once"))
    if d.interleave_probs is not None:
        if d.mix_strategy == "concat":
            raise UserError("interleave_probs: only valid with an interleave_* mix_strategy")
        probs = [p.strip() for p in str(d.interleave_probs).split(",")]
        if d.dataset and len(probs) != len(d.dataset.split(",")):
            raise UserError("interleave_probs: give one probability per dataset")
    if d.eval_dataset and d.val_size > 1e-6:
        raise UserError("val_size: cannot be set together with eval_dataset")
    if d.mask_history and d.train_on_prompt:
        raise UserError("mask_history: incompatible with train_on_prompt")
    if d.neat_packing:
        d.packing = True  # as LLaMA-Factory: neat packing is a kind of packing


def _validate_preference(cfg: RunConfig) -> None:
    """The preference keys' values are checked whatever the stage, so a typo never waits for the stage
    that reads it."""
    f = cfg.finetuning
    if f.pref_loss in ("kto_pair", "bco"):
        raise UserError(
            f"pref_loss: '{f.pref_loss}' is not implemented by lf-dist (available: {', '.join(PREF_LOSSES)})"
        )
    _choice("pref_loss", f.pref_loss, PREF_LOSSES)
    _positive("pref_beta", f.pref_beta)
    for key in ("pref_ftx", "simpo_gamma", "kto_chosen_weight", "kto_rejected_weight"):
        _positive(key, getattr(f, key), allow_zero=True)
    if not 0.0 <= f.dpo_label_smoothing < 0.5:
        raise UserError(f"dpo_label_smoothing: must be in [0, 0.5), got {f.dpo_label_smoothing}")
    if f.ref_model is not None and not is_hub_name(f.ref_model) and not (Path(f.ref_model) / "config.json").is_file():
        raise UserError(
            f"ref_model: {f.ref_model} is not a Hugging Face checkpoint folder (no config.json) or hub name"
        )
