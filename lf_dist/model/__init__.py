"""Load a Hugging Face causal LM and its tokenizer, then apply the fine-tuning method (full, freeze, LoRA)."""

from lf_dist.model.adapter import apply_finetuning
from lf_dist.model.loader import load_model, load_tokenizer

__all__ = ["apply_finetuning", "load_model", "load_tokenizer"]
