"""How one model of a run is built: the policy (fine-tuning applied) or a frozen model (a reference), on a device
or on the meta device. The strategy decides, rank by rank, which of the two it builds (`create_model`,
`prepare_frozen`); the recipe is the one object that carries everything else."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from lf_dist.model.adapter import apply_finetuning
from lf_dist.model.heads import CAUSAL_LM, Head
from lf_dist.model.loader import load_model


@dataclass(frozen=True)
class ModelRecipe:
    cfg: object  # the run's config
    tokenizer: object
    head: Head = CAUSAL_LM
    dtype: torch.dtype | None = None  # None: the config's compute dtype
    device: torch.device | None = None  # where a quantized base is loaded (it cannot move afterwards)
    path: str | None = None  # a frozen model's checkpoint; None: the policy, with its fine-tuning method applied
    quantize: bool = True  # a quantization_bit base loaded through bitsandbytes (False: the strategy quantizes it)

    def build(self, meta: bool = False) -> torch.nn.Module:
        """The model; `meta=True` builds it on the meta device (no memory, weights come later)."""
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = load_model(
                self.cfg,
                self.tokenizer,
                self.head,
                dtype=self.dtype,
                meta=meta,
                path=self.path,
                device=None if meta else self.device,
                quantize=self.quantize,
            )
            return model if self.path is not None else apply_finetuning(model, self.cfg, self.head)

    def check(self) -> None:
        """The policy on the meta device (no weights, no memory), so that a freeze, lora_target or head mistake
        fails in one line before any data is preprocessed."""
        with torch.device("meta"), warnings.catch_warnings():
            # an adapter_name_or_path's weights copied onto meta parameters: a no-op here, and torch says so
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            model = load_model(self.cfg, self.tokenizer, self.head, meta=True)
            apply_finetuning(model, self.cfg, self.head, quiet=True)
