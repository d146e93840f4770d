"""Model heads: what sits on top of the decoder for a stage — the language-model head, or a new score head.

A stage names its head (`lf_dist/train/stages.py`); model/ builds and fine-tunes from it, never from a
stage name. ppo's policy carries a value head beside its language-model head (TRL's `v_head.summary` linear on
the last hidden state, the names LLaMA-Factory saves in value_head.safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass(frozen=True)
class Head:
    name: str
    auto_class: str  # the transformers Auto* class that builds the model with this head
    peft_task: str  # LoRA task type: SEQ_CLS also trains and saves a new head with the adapter
    new_modules: tuple[str, ...] = ()  # created fresh on load, so always trained (freeze keeps them trainable)
    # config values the head needs, filled from the tokenizer: {"pad_token_id": "pad_token_id"} etc.
    config: dict = field(default_factory=dict)
    scores_vocabulary: bool = True  # logits over the vocabulary (a language-model head), not a single score
    value_head: bool = False  # a `v_head` (ValueHead) is added beside the language-model head

    def auto(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def config_values(self, tokenizer) -> dict:
        return {k: (getattr(tokenizer, v) if isinstance(v, str) else v) for k, v in self.config.items()}


CAUSAL_LM = Head("causal_lm", "AutoModelForCausalLM", "CAUSAL_LM")
# One score per sequence from a new linear `score` layer (a reward model), read at the last real token.
SEQUENCE_SCORE = Head(
    "sequence_score",
    "AutoModelForSequenceClassification",
    "SEQ_CLS",
    new_modules=("score",),
    config={"num_labels": 1, "pad_token_id": "pad_token_id"},
    scores_vocabulary=False,
)

# The language-model head and a new value head (ppo's policy): the value head always trains and is saved with
# LoRA adapters (peft's modules_to_save).
CAUSAL_LM_VALUE = Head(
    "causal_lm_value", "AutoModelForCausalLM", "CAUSAL_LM", new_modules=("v_head",), value_head=True
)


class ValueHead(torch.nn.Module):
    """One value per position from the last hidden state (TRL's ValueHead without its dropout, so that ranks and
    processes draw no random numbers for it)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.summary.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden)


def add_value_head(model, dtype: torch.dtype) -> None:
    """A fresh `v_head` on `model` (its default init draws from the seeded global generator, on every backend
    alike)."""
    model.v_head = ValueHead(model.config.hidden_size, dtype)


def find_module(model, name: str) -> torch.nn.Module | None:
    """The outermost submodule called `name` (peft's wrapper around it for LoRA), through any wrapper."""
    named = [(n, m) for n, m in model.named_modules() if n.split(".")[-1] == name]
    return min(named, key=lambda x: len(x[0]))[1] if named else None
