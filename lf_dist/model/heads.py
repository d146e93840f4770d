"""Model heads: what sits on top of the decoder for a stage — the language-model head, or a new score head.

A stage names its head (`lf_dist/train/stages.py`); model/ builds and fine-tunes from it, never from a
stage name. A value head (ppo) will be one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Head:
    name: str
    auto_class: str  # the transformers Auto* class that builds the model with this head
    peft_task: str  # LoRA task type: SEQ_CLS also trains and saves a new head with the adapter
    new_modules: tuple[str, ...] = ()  # created fresh on load, so always trained (freeze keeps them trainable)
    # config values the head needs, filled from the tokenizer: {"pad_token_id": "pad_token_id"} etc.
    config: dict = field(default_factory=dict)
    scores_vocabulary: bool = True  # logits over the vocabulary (a language-model head), not a single score

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
