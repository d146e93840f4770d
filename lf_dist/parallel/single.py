"""One process, one device (CPU or a single GPU)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lf_dist.errors import UserError
from lf_dist.parallel.base import Strategy
from lf_dist.train.optim import build_optimizer


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
    name = "single"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if cfg.train.fp16 and self.device.type != "cuda":
            raise UserError("fp16: needs a CUDA GPU (loss scaling); use bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.fp16 else None

    def setup(self, model):
        model = model.to(self.device)
        return model, build_optimizer(model, self.cfg)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, model, optimizer, max_grad_norm):
        params = [p for p in model.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def export(self, model, tokenizer, path):
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)

    def save_checkpoint(self, model, optimizer, scheduler, tokenizer, path, save_only_model):
        self.export(model, tokenizer, path)  # checkpoints are loadable Hugging Face models, as LLaMA-Factory's
        if save_only_model:
            return
        torch.save(optimizer.state_dict(), Path(path) / "optimizer.pt")
        torch.save(scheduler.state_dict(), Path(path) / "scheduler.pt")
        if self.scaler:
            torch.save(self.scaler.state_dict(), Path(path) / "scaler.pt")

    def load_checkpoint(self, model, optimizer, scheduler, path):
        path = Path(path)
        if not (path / "optimizer.pt").is_file():
            raise UserError(
                f"resume_from_checkpoint: {path} was written by a distributed run; resume it with the "
                "same kind of launch (or any torchrun world size with fsdp2/ddp)"
            )
        load_hf_weights(model, path, self.device)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if self.scaler and (path / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
