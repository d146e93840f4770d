"""Typed run configuration. Field names and defaults are LLaMA-Factory's, so its YAML files load unchanged.

Each section is a flat dataclass: a YAML key maps to exactly one field of one section. Validation of values
that depend on each other lives in `validate.py`, in one place; it fills defaults into a copy. Planning resolves
the config into a new, frozen one (`RunConfig.replace(...).freeze()`): after launch nothing writes it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import FrozenInstanceError, dataclass, field, fields, replace
from pathlib import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_name(name: str) -> bool:
    """`org/name` that is not a local path: a model repository on a hub (lf_dist/model/hub.py downloads it)."""
    return bool(_REPO_ID.fullmatch(name)) and not Path(name).exists()


# `auto`: the planner picks full, lora or 4-bit qlora, whichever fits first (lf-dist's own value)
FINETUNING_TYPES = ("full", "freeze", "lora", "oft", "auto")
# the peft adapter methods: what trains (and is saved) is an adapter on a frozen base
ADAPTER_TYPES = ("lora", "oft")
# `varlen` (lf-dist's own value): torch's varlen kernel on CUDA, one sdpa call per example elsewhere; `auto`: the
# planner picks fa2 (flash-attn installed, CUDA), else varlen
FLASH_ATTN = ("auto", "disabled", "sdpa", "fa2", "varlen")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
LAUNCHERS = ("auto", "torchrun", "ray")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
QUANTIZATION_BITS = (4, 8)
QUANTIZATION_TYPES = ("nf4", "fp4")
# `optim` values lf-dist runs: torch's AdamW, or bitsandbytes' 8-bit (paged) AdamW
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
# The values `pref_loss` may take (what each means is the dpo stage's business, in train/pref_losses.py).
PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
# online RL: the reward model's kinds (LLaMA-Factory's `api` is refused), GRPO's losses and reward scaling (TRL's)
REWARD_MODEL_TYPES = ("lora", "full")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
# stages that generate while they train: a train config of these reads the generation keys
ROLLOUT_STAGES = ("ppo", "ppo_custom", "grpo")
# `report_to` trackers lf-dist implements (each an optional extra); "all" means every one that is installed
TRACKERS = ("tensorboard", "wandb", "mlflow")
# megatron-core's activation recompute settings
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
INFER_BACKENDS = ("huggingface",)
INFER_DTYPES = ("auto", "float16", "bfloat16", "float32")
EXPORT_DEVICES = ("cpu", "auto")
# The commands and the sections each reads; a key of another section is reported as having no effect there.
COMMANDS = {
    "train": ("model", "data", "finetuning", "train", "launch"),  # + generation: ROLLOUT_STAGES, do_predict
    "chat": ("model", "data", "finetuning", "generation"),
    "api": ("model", "data", "finetuning", "generation"),
    "export": ("model", "data", "finetuning", "export"),
}


class Freezable:
    """A config section that refuses assignment once frozen (`RunConfig.freeze`)."""

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen"):
            raise FrozenInstanceError(
                f"cannot assign to {name!r}: the config was resolved by planning and is read-only after launch"
            )
        object.__setattr__(self, name, value)


@dataclass
class ModelArgs(Freezable):
    model_name_or_path: str | None = None
    adapter_name_or_path: str | None = None
    trust_remote_code: bool = False
    flash_attn: str = "auto"
    use_fast_tokenizer: bool = True
    resize_vocab: bool = False
    # Hub names (`org/model`): downloaded once per node into the Hugging Face cache (or ModelScope's with
    # USE_MODELSCOPE_HUB=1), see lf_dist/model/hub.py
    cache_dir: str | None = None
    model_revision: str = "main"
    hf_hub_token: str | None = None
    ms_hub_token: str | None = None
    # QLoRA through bitsandbytes (LLaMA-Factory's names and defaults)
    quantization_method: str = "bnb"
    quantization_bit: int | None = None
    quantization_type: str = "nf4"
    double_quantization: bool = True
    upcast_layernorm: bool = False
    enable_liger_kernel: bool | None = None  # None: the planner's choice (on with CUDA and liger-kernel)
    # mixture-of-depths (the `mixture-of-depth` package): convert a model, or load a converted one
    mixture_of_depths: str | None = None
    # torch's reentrant activation checkpointing (LLaMA-Factory's default); None: lf-dist's non-reentrant one,
    # which computes the same gradients and needs no inputs that require grad
    use_reentrant_gc: bool | None = None


@dataclass
class DataArgs(Freezable):
    dataset: str | None = None
    eval_dataset: str | None = None
    dataset_dir: str = "data"
    template: str | None = None
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    overwrite_cache: bool = False
    preprocessing_num_workers: int | None = None
    preprocessing_batch_size: int = 1000
    train_on_prompt: bool = False
    mask_history: bool = False
    default_system: str | None = None
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    tool_format: str | None = None
    packing: bool | None = None
    neat_packing: bool = False
    # lf-dist's own: the examples of a micro-batch go end to end in one row, no padding (None: the plan decides)
    padding_free: bool | None = None
    tokenized_path: str | None = None
    data_shared_file_system: bool = False
    mix_strategy: str = "concat"
    interleave_probs: str | None = None


@dataclass
class FinetuningArgs(Freezable):
    stage: str = "sft"
    finetuning_type: str = "lora"
    allow_fallback: bool = False  # the planner may fall back full → lora → qlora when the method does not fit
    lora_rank: int = 8
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_target: str = "all"
    additional_target: str | None = None
    use_dora: bool = False
    use_rslora: bool = False
    # lf-dist's own: plain LoRA layers scale their update at rank r and add it in place (None: the plan decides)
    lean_lora: bool | None = None
    use_llama_pro: bool = False  # freeze: train only the blocks LLaMA-Pro's expansion added (every stride-th)
    # OFT through peft (finetuning_type: oft)
    oft_rank: int = 0
    oft_block_size: int = 32
    oft_target: str = "all"
    module_dropout: float = 0.0
    # PiSSA initialisation of LoRA (peft), and converting the trained adapter back to a plain LoRA one
    pissa_init: bool = False
    pissa_iter: int = 16
    pissa_convert: bool = False
    # LoRA+: B matrices at loraplus_lr_ratio × the learning rate
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    # optimizers from their own libraries (LLaMA-Factory's names and defaults)
    use_galore: bool = False
    galore_target: str = "all"
    galore_rank: int = 16
    galore_update_interval: int = 200
    galore_scale: float = 2.0
    galore_proj_type: str = "std"
    galore_layerwise: bool = False
    use_apollo: bool = False
    apollo_target: str = "all"
    apollo_rank: int = 16
    apollo_update_interval: int = 200
    apollo_scale: float = 32.0
    apollo_proj: str = "random"
    apollo_proj_type: str = "std"
    apollo_scale_type: str = "channel"
    apollo_layerwise: bool = False
    apollo_scale_front: bool = False
    use_badam: bool = False
    badam_mode: str = "layer"
    badam_start_block: int | None = None
    badam_switch_mode: str | None = "ascending"
    badam_switch_interval: int | None = 50
    badam_update_ratio: float = 0.05
    badam_mask_mode: str = "adjacent"
    badam_verbose: int = 0
    use_adam_mini: bool = False
    use_muon: bool = False
    pure_bf16: bool = False  # train in bf16 without fp32 master weights or autocast
    # sft's token losses other than cross-entropy (the stage registry's loss functions)
    use_dft_loss: bool = False
    use_asft_loss: bool = False
    asft_alpha: float = 0.1
    use_eaft_loss: bool = False
    eaft_alpha: float = 1.0
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: str = "all"
    freeze_extra_modules: str | None = None
    plot_loss: bool = False
    disable_gradient_checkpointing: bool = False
    # preference stages (rm, dpo, kto): LLaMA-Factory's RLHF arguments
    pref_beta: float = 0.1
    pref_ftx: float = 0.0
    pref_loss: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    ref_model: str | None = None
    # online RL, ppo and ppo_custom: LLaMA-Factory's keys and defaults
    reward_model: str | None = None
    reward_model_adapters: str | None = None
    reward_model_quantization_bit: int | None = None
    reward_model_type: str = "lora"
    ppo_buffer_size: int = 1
    ppo_epochs: int = 4
    ppo_score_norm: bool = False
    ppo_target: float = 6.0
    ppo_whiten_rewards: bool = False
    # reward functions (`path.py:function`, comma-separated or a list) and their weights; ppo_custom's default is
    # the fork's custom_rewards/reward_functions.py:custom_reward
    reward_funcs: str | list | None = None
    reward_weights: list | None = None
    # grpo: TRL GRPOConfig's names and defaults (max_completion_length is max_new_tokens)
    num_generations: int = 8
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str | bool = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True
    log_completions: bool = False  # TRL's: every rollout's prompts, completions and rewards in completions.jsonl


@dataclass
class TrainArgs(Freezable):
    output_dir: str | None = None
    do_train: bool = True
    do_eval: bool = False
    overwrite_output_dir: bool = False
    logging_steps: float = 500
    logging_strategy: str = "steps"
    logging_first_step: bool = False
    save_steps: float = 500
    save_strategy: str = "steps"
    save_total_limit: int | None = None
    save_only_model: bool = False
    report_to: str | list | None = "none"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: float = 0
    bf16: bool = False
    fp16: bool = False
    seed: int = 42
    data_seed: int | None = None
    resume_from_checkpoint: str | bool | None = None
    ddp_timeout: int = 1800
    dataloader_num_workers: int = 0
    eval_strategy: str = "no"
    eval_steps: float | None = None
    disable_tqdm: bool = False
    strategy: str = "auto"
    deepspeed: str | dict | None = None
    fsdp_shard_size: int | None = None
    fsdp_cpu_offload: bool = False
    fsdp_reshard_after_forward: bool = True
    save_shard_size: str = "5GB"
    gradient_checkpointing: bool | None = None
    gradient_checkpointing_kwargs: dict | None = None
    optim: str = "adamw_torch"
    # prediction: generate for the eval dataset and score it (BLEU-4, ROUGE), as LLaMA-Factory's sft does
    do_predict: bool = False
    predict_with_generate: bool = False
    # float8 training through torchao (CUDA only)
    fp8: bool = False
    fp8_backend: str = "auto"
    fp8_enable_fsdp_float8_all_gather: bool = False
    torch_compile: bool = False
    # lf-dist's own: stop after this many non-finite (NaN / inf) steps in a row, without saving
    max_nonfinite_steps: int = 3
    # trackers (report_to): where TensorBoard writes (default output_dir/runs/<time>_<host>), and the run's name
    logging_dir: str | None = None
    run_name: str | None = None
    # strategy megatron (also `use_mca: true`, USE_MCA=1, USE_MEGATRON_BRIDGE=1): megatron-core's names
    use_mca: bool = False
    use_megatron_bridge: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    use_distributed_optimizer: bool | None = None  # None: on with CUDA and more than one data-parallel rank
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    recompute_granularity: str | None = None  # full or selective
    recompute_method: str | None = None  # uniform or block (full recompute)
    recompute_num_layers: int | None = None


@dataclass
class GenerationArgs(Freezable):
    """LLaMA-Factory's generating arguments and inference keys, for `chat` and `api` (defaults are its own)."""

    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    max_length: int = 1024
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    infer_backend: str = "huggingface"
    infer_dtype: str = "auto"


@dataclass
class ExportArgs(Freezable):
    """LLaMA-Factory's export keys (`lf-dist export`): merge adapters, write Hugging Face shards."""

    export_dir: str | None = None
    export_size: float = 5  # GB per shard (LLaMA-Factory's int; a fraction is accepted)
    export_device: str = "cpu"
    export_legacy_format: bool = False  # .bin (pickle) shards instead of safetensors
    export_hub_model_id: str | None = None
    export_quantization_bit: int | None = None


@dataclass
class LaunchArgs(Freezable):
    """How the processes start: torchrun (the environment contract), or a Ray cluster (LLaMA-Factory's ray_* keys
    of both its generations, on Ray Train)."""

    launcher: str = "auto"  # auto: torchrun or one process as the environment says; ray (also USE_RAY=1)
    ray_num_workers: int = 1
    ray_init_kwargs: dict | str | None = None
    resources_per_worker: dict | str | None = None  # default {"GPU": 1} on GPUs, {"CPU": 1} otherwise
    placement_strategy: str = "PACK"
    ray_run_name: str | None = None
    ray_storage_path: str | None = None
    ray_max_failures: int = 0
    master_addr: str | None = None
    master_port: int | None = None


SECTIONS = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetuning": FinetuningArgs,
    "train": TrainArgs,
    "launch": LaunchArgs,
    "generation": GenerationArgs,
    "export": ExportArgs,
}
# LLaMA-Factory's spellings that mean the same as one of our fields.
ALIASES = {"evaluation_strategy": "eval_strategy", "lora_r": "lora_rank", "max_completion_length": "max_new_tokens"}


def sections_read(command: str, stage: str, predict: bool = False) -> tuple[str, ...]:
    """The config sections `command` reads; training a rollout stage, or with do_predict (`predict`), also reads
    the generation keys."""
    sections = COMMANDS[command]
    generates = command == "train" and (stage in ROLLOUT_STAGES or predict)
    return (*sections, "generation") if generates else sections


def key_owner() -> dict[str, str]:
    """Map every accepted key to the section that holds it."""
    return {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


@dataclass
class RunConfig(Freezable):
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetuning: FinetuningArgs = field(default_factory=FinetuningArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    launch: LaunchArgs = field(default_factory=LaunchArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    command: str = "train"  # the lf-dist command this config was read for (see COMMANDS)
    # Keys accepted for compatibility that change nothing in lf-dist: reported once, never silently dropped.
    ignored: dict = field(default_factory=dict)
    source: str | None = None
    # The keys the user gave (file or overrides): the planner decides only what the user left unset.
    given: set = field(default_factory=set)

    @property
    def frozen(self) -> bool:
        return bool(self.__dict__.get("_frozen"))

    def freeze(self) -> RunConfig:
        """Make this config and its sections read-only (its `given` keys a frozenset); returns it."""
        for section in SECTIONS:
            object.__setattr__(getattr(self, section), "_frozen", True)
        object.__setattr__(self, "given", frozenset(self.given))
        object.__setattr__(self, "_frozen", True)
        return self

    def replace(self, **changes: dict) -> RunConfig:
        """A new, writable config: a deep copy with `changes` ({section: {field: value}}) applied."""
        out = copy.deepcopy(self)
        for obj in (out, *(getattr(out, s) for s in SECTIONS)):
            obj.__dict__.pop("_frozen", None)
        out.given = set(out.given)
        for section, values in changes.items():
            setattr(out, section, replace(getattr(out, section), **values))
        return out

    def to_dict(self) -> dict:
        """Every field by name; hub tokens are not written out (the dict goes into output_dir and checkpoints)."""
        out = {}
        for section in SECTIONS:
            obj = getattr(self, section)
            out.update({f.name: getattr(obj, f.name) for f in fields(obj)})
        return {k: ("<set>" if k.endswith("_hub_token") and v else v) for k, v in out.items()}
