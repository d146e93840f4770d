"""One process, one device (CPU or a single GPU)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lf_dist.errors import RunStopped
from lf_dist.parallel.base import Strategy


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def load_hf_weights(model, path: Path, device) -> None:
    """Weights saved by `save_pretrained` (adapter or full model) back into a live model."""
    path = Path(path)
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors", device=str(device)))
        return
    state = {}
    for f in sorted(path.glob("model*.safetensors")):
        state.update(load_file(f, device=str(device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")


class SingleStrategy(Strategy):
    def __init__(self, cfg):
        super().__init__(cfg, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))

    def setup(self, model, build_optimizer):
        model = self.place(model)
        return model, build_optimizer(model)

    @staticmethod
    def _write_hf(model, tokenizer, path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    def export(self, model, tokenizer, path):
        try:
            self._write_hf(model, tokenizer, path)
            self.finish_export(path)
        except OSError as err:  # a full disk, a read-only folder: one line (checkpoints catch their own)
            raise RunStopped(f"could not write the model to {path}: {err}") from None

    def save_checkpoint(self, model, optimizer, scheduler, tokenizer, path, save_only_model):
        self._write_hf(model, tokenizer, path)  # checkpoints are loadable Hugging Face models, as LLaMA-Factory's
        if save_only_model:
            return
        torch.save(optimizer.state_dict(), Path(path) / "optimizer.pt")
        torch.save(scheduler.state_dict(), Path(path) / "scheduler.pt")
        self.save_scaler(path)

    def load_checkpoint(self, model, optimizer, scheduler, path):
        path = Path(path)
        self.check_resumable(path)
        load_hf_weights(model, path, self.device)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.load_scaler(path)
