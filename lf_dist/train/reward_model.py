"""The frozen reward model that `stage: ppo` scores completions with, from any source a reward model comes in.

LLaMA-Factory's keys: `reward_model_type: lora` makes `reward_model` an adapter on the policy's base
(model_name_or_path); `full` makes it a whole model folder, with `reward_model_adapters` on it. Either may be:
- an lf-dist `stage: rm` output: a SEQ_CLS LoRA adapter (the `score` layer saved with it), a whole
  *ForSequenceClassification folder, or a checkpoint-N of any backend (read as `serve/weights.py` reads them);
- a LLaMA-Factory rm output: a causal-LM adapter or folder plus `value_head.safetensors` (TRL's
  `v_head.summary` linear), in the last adapter's folder, else the model's.

Adapters are merged: the reward model is a plain frozen model, scored at each row's last real token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lf_dist.config import RunConfig
from lf_dist.errors import UserError
from lf_dist.model.heads import CAUSAL_LM, SEQUENCE_SCORE, VALUE_HEAD_FILE, Head, ValueHead, find_module
from lf_dist.model.hub import local_model
from lf_dist.model.loader import load_model
from lf_dist.serve.weights import (
    Sources,
    _head_of,
    _is_prequantized,
    _lay_over,
    _loading_config,
    is_adapter,
    resolve,
    sharded_kind,
)
from lf_dist.train.token_logps import _forward_as, causal_lm

MISSING = (
    "reward_model: stage ppo scores completions with a reward model; set reward_model (an rm output) or use stage "
    "ppo_custom / grpo with reward_funcs"
)
V_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")


@dataclass
class RewardPlan:
    cfg: RunConfig  # reward_model_config(cfg)
    sources: Sources
    head: Head  # SEQUENCE_SCORE, or CAUSAL_LM with the value head below
    value_head: Path | None  # value_head.safetensors of a LLaMA-Factory reward model


def reward_model_config(cfg: RunConfig) -> RunConfig:
    """The config whose model_name_or_path / adapter_name_or_path say where the reward model's weights are."""
    finetuning_args = cfg.finetuning
    if finetuning_args.reward_model_type == "full":
        base, adapters = finetuning_args.reward_model, finetuning_args.reward_model_adapters
    else:
        base, adapters = cfg.model.model_name_or_path, finetuning_args.reward_model
    # the policy's QLoRA does not quantize the reward model (LLaMA-Factory's reward_model_quantization_bit would)
    return cfg.replace(model={"model_name_or_path": base, "adapter_name_or_path": adapters, "quantization_bit": None})


def check_reward_model(cfg: RunConfig) -> None:
    """One-line UserErrors for a reward model that cannot score the policy's completions; reads configs,
    adapter configs and safetensors headers only."""
    plan_reward_model(cfg)


def plan_reward_model(cfg: RunConfig) -> RewardPlan:
    """Where the reward model's weights are and which head scores, every source checked."""
    finetuning_args = cfg.finetuning
    if not finetuning_args.reward_model:
        raise UserError(MISSING)
    full = finetuning_args.reward_model_type == "full"
    if not full and finetuning_args.finetuning_type != "lora":
        raise UserError(
            f"reward_model_type: lora reward models are adapters on the policy's LoRA base, and finetuning_type "
            f"{finetuning_args.finetuning_type} trains that base; full/freeze PPO needs reward_model_type: full"
        )
    if not full and finetuning_args.reward_model_adapters:
        raise UserError(
            "reward_model_adapters: adapters on a whole reward model (reward_model_type: full); a lora reward "
            "model is the one adapter in reward_model"
        )
    folder = Path(local_model(finetuning_args.reward_model, cfg.model, "reward_model"))
    _check_kind(folder, full)
    rcfg = reward_model_config(cfg)
    sources = _resolve(rcfg, full)
    if _is_prequantized(sources.base) and (sources.adapters or sources.sharded):
        raise UserError(
            f"reward_model: {sources.base} is quantized, and a reward model's adapters are merged into its base; "
            "give an unquantized base"
        )
    config = _model_config(sources)
    if _head_of(sources) is SEQUENCE_SCORE or any(
        a.endswith("ForSequenceClassification") for a in config.get("architectures") or []
    ):
        head, value_head = SEQUENCE_SCORE, None
    else:
        head, value_head = CAUSAL_LM, _value_head_file(cfg, folder, config)
    _check_vocabulary(cfg, config)
    return RewardPlan(rcfg, sources, head, value_head)


def _check_kind(folder: Path, full: bool) -> None:
    """`reward_model` is what reward_model_type says: an adapter (lora) or a whole model (full), or a checkpoint."""
    if not folder.is_dir():
        raise UserError(f"reward_model: '{folder}' is not a folder, nor a hub model name (org/name)")
    model, adapter = (folder / "config.json").is_file(), is_adapter(folder)
    if sharded_kind(folder) or (adapter if not full else model):
        return
    if not full and model:
        raise UserError(
            f"reward_model: {folder} is a whole model, not a LoRA adapter; set reward_model_type: full to score "
            "with it"
        )
    if full and adapter:
        raise UserError(
            f"reward_model: {folder} is a LoRA adapter, not a whole model; set reward_model_type: lora (an adapter "
            "on the policy's base), or give the model as reward_model and the adapter as reward_model_adapters"
        )
    raise UserError(
        f"reward_model: {folder} is neither a model (config.json) nor a LoRA adapter (adapter_config.json) nor an "
        "lf-dist checkpoint"
    )


def _resolve(rcfg: RunConfig, full: bool) -> Sources:
    """`resolve` with its messages naming the reward model's keys, not the policy's."""
    keys = {"adapter_name_or_path": "reward_model_adapters" if full else "reward_model"}
    if full:
        keys["model_name_or_path"] = "reward_model"
    try:
        return resolve(rcfg)
    except UserError as err:
        message = re.sub(r"\b(model|adapter)_name_or_path\b", lambda m: keys.get(m[0], m[0]), str(err))
        raise UserError(message) from None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _model_config(sources: Sources) -> dict:
    """The reward model's config.json: a sharded checkpoint's own (a full rm run's names its score head), else
    its base's."""
    if sources.sharded is not None and (sources.sharded / "config.json").is_file():
        return _read_json(sources.sharded / "config.json")
    return _read_json(Path(sources.base) / "config.json")


def _text_value(config: dict, key: str):
    """A text model's config value, also from a multimodal config's text_config."""
    return config.get(key, (config.get("text_config") or {}).get(key))


def _value_head_file(cfg: RunConfig, folder: Path, config: dict) -> Path:
    """LLaMA-Factory's value_head.safetensors: in the last adapter's folder (as it reads it), else the model's;
    its tensors' names and shapes checked from the header."""
    from safetensors import safe_open

    adapters = [a.strip() for a in (cfg.finetuning.reward_model_adapters or "").split(",") if a.strip()]
    folders = [Path(local_model(adapters[-1], cfg.model, "reward_model_adapters"))] if adapters else []
    for candidate in (*folders, folder):
        path = candidate / VALUE_HEAD_FILE
        if path.is_file():
            break
    else:
        raise UserError(
            f"reward_model: {folder} has no score head (a SEQ_CLS adapter or a *ForSequenceClassification model) "
            f"and no {VALUE_HEAD_FILE} (a LLaMA-Factory value head): is it the output of an rm stage?"
        )
    hidden = _text_value(config, "hidden_size")
    expected = {V_HEAD_KEYS[0]: [1, hidden], V_HEAD_KEYS[1]: [1]}
    with safe_open(path, "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, shape in expected.items():
        if shapes.get(key) != shape:
            found = f"has shape {shapes[key]}" if key in shapes else "is missing"
            raise UserError(f"reward_model: {path}: {key} {found}, expected {shape} (hidden size {hidden})")
    return path


def _check_vocabulary(cfg: RunConfig, config: dict) -> None:
    """The reward model reads the policy's token ids, so it must have the policy's vocabulary."""
    policy = Path(local_model(cfg.model.model_name_or_path, cfg.model, config_only=True)) / "config.json"
    theirs, ours = _text_value(config, "vocab_size"), _text_value(_read_json(policy), "vocab_size")
    if theirs is not None and ours is not None and theirs != ours:
        raise UserError(
            f"reward_model: its vocabulary has {theirs} tokens, the policy's ({cfg.model.model_name_or_path}) "
            f"{ours}; the reward model scores the policy's token ids, so it needs the policy's tokenizer"
        )


def build_reward_model(
    cfg: RunConfig, tokenizer, dtype: torch.dtype, meta: bool = False, device: torch.device | None = None
) -> torch.nn.Module:
    """The reward model in `dtype`, frozen, in eval mode, adapters merged; a SEQ_CLS model, or a causal LM with a
    `v_head` (LLaMA-Factory's value head).

    `meta=True`: the same architecture on the meta device, with `config._name_or_path` empty. Sharded strategies
    read a meta model's rows straight from the files at `_name_or_path` when they find every tensor there; the
    reward model's merged adapters, laid-over checkpoint and value head are not in the base's files, so it is
    left empty and they build the model for real (`meta=False`) and hand out its tensors instead.
    """
    plan = plan_reward_model(cfg)
    loading = _loading_config(plan.cfg, plan.sources.base)
    if meta:
        with torch.device("meta"):
            model = load_model(loading, tokenizer, plan.head, dtype=dtype, meta=True)
            if plan.value_head is not None:
                model.v_head = ValueHead(model.config.hidden_size, dtype)
        model.config._name_or_path = ""
    else:
        # under sharded strategies rank 0 alone builds it for real: the draws that initialize layers about to be
        # overwritten (a new score layer, the value head) must leave its random stream as the other ranks' is
        with torch.random.fork_rng(devices=[]):
            model = _load_merged(loading, plan, tokenizer, dtype, device or torch.device("cpu"))
    model.requires_grad_(False)
    return model.eval()


def _load_merged(loading: RunConfig, plan: RewardPlan, tokenizer, dtype: torch.dtype, device: torch.device):
    """`load_weights(merge=True)` with the reward head: that one takes its head from the adapters' task types,
    so a whole *ForSequenceClassification folder would come back a causal LM without its score layer."""
    from peft import PeftModel
    from safetensors.torch import load_file

    sources = plan.sources
    model = load_model(loading, tokenizer, plan.head, dtype=dtype, device=device).to(device)
    for adapter in sources.adapters:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    if sources.sharded is not None:
        model = _lay_over(model, sources.sharded, device)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    if plan.value_head is not None:
        v_head = ValueHead(model.config.hidden_size, dtype)
        state = load_file(plan.value_head)
        v_head.load_state_dict({k.removeprefix("v_head."): state[k].to(dtype) for k in V_HEAD_KEYS})
        model.v_head = v_head.to(device)
    return model


@torch.no_grad()
def reward_scores(model, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The fp32 score [B] of each right-padded row at its last real token `last` [B]. No attention mask is needed:
    attention is causal and padding only follows the real tokens. The model is called through its own
    `__call__`, so that every wrapper's hooks (FSDP2, DeepSpeed) gather its weights."""
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = last.to(input_ids.device)
    v_head = find_module(model, "v_head")
    if v_head is None:
        # the score layer's per-token output, as RewardLoss reads it: the model's own pooling finds the last
        # token from pad_token_id, which a completion may also end with
        captured = []
        handle = find_module(model, "score").register_forward_hook(lambda mod, args, out: captured.append(out))
        try:
            model(input_ids=input_ids, use_cache=False)
        finally:
            handle.remove()
        return captured[-1][rows, last, 0].float()
    lm = causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    values = []

    def forward(*args, **kwargs):
        # the decoder only: no logits over the vocabulary, the value head at each row's last token
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("labels", "logits_to_keep")}
        hidden = decoder(*args, **kwargs).last_hidden_state[rows, last]
        values.append(v_head(hidden.to(v_head.weight.dtype)).squeeze(-1).float())
        return values[-1]

    with _forward_as(lm, forward):
        model(input_ids=input_ids, use_cache=False)
    return values[-1]
