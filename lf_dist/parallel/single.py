"""One process, one device (CPU or a single GPU)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lf_dist.errors import UserError
from lf_dist.parallel.base import Strategy


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


class SingleStrategy(Strategy):
    name = "single"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if cfg.train.fp16 and self.device.type != "cuda":
            raise UserError("fp16: needs a CUDA GPU (loss scaling); use bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.fp16 else None

    def wrap(self, model):
        return model.to(self.device)

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

    def save_model(self, model, tokenizer, path):
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)

    def save_train_state(self, optimizer, scheduler, path):
        torch.save(optimizer.state_dict(), Path(path) / "optimizer.pt")
        torch.save(scheduler.state_dict(), Path(path) / "scheduler.pt")
        if self.scaler:
            torch.save(self.scaler.state_dict(), Path(path) / "scaler.pt")

    def load_model_weights(self, model, path):
        path = Path(path)
        if is_peft(model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors", device=str(self.device)))
            return
        files = sorted(path.glob("model*.safetensors"))
        state = {}
        for f in files:
            state.update(load_file(f, device=str(self.device)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied weights are saved once; everything else must be present.
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
            raise RuntimeError(
                f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
            )

    def load_train_state(self, optimizer, scheduler, path):
        path = Path(path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if self.scaler and (path / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
