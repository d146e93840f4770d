"""The Strategy interface the training loop is written against."""

from __future__ import annotations

import contextlib
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from lf_dist.errors import UserError
from lf_dist.parallel import formats


def quantized_params(model) -> set:
    """The bitsandbytes-quantized weights (4-bit or int8) of a model: they neither move nor shard."""
    return {p for p in model.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")}


def storage_bytes(tensor) -> int:
    """Bytes a rank stores for one parameter: its local shard (FSDP2's DTensor, ZeRO-3's partition), the inner
    tensors of a quantized tensor subclass (torchao's NF4), or the tensor itself."""
    if hasattr(tensor, "ds_tensor"):  # ZeRO-3: the parameter itself is an empty placeholder
        tensor = tensor.ds_tensor
    local = getattr(tensor, "_local_tensor", tensor)
    if hasattr(local, "__tensor_flatten__"):  # a wrapper subclass: the inner tensors hold the storage
        names, _ = local.__tensor_flatten__()
        return sum(storage_bytes(getattr(local, name)) for name in names)
    return local.numel() * local.element_size()


def weight_bytes(model) -> int:
    """The weights this rank holds, counted from the local storage of every parameter."""
    return sum(storage_bytes(p) for p in model.parameters())


def release_freed_memory() -> None:
    """Give the heap pages that freed tensors leave behind back to the OS (glibc keeps them otherwise: a rank that
    handed out a full model would carry its size in RSS for the whole run). A no-op off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder blocks (the model's `_no_split_modules` classes), through DDP / DeepSpeed / peft wrappers."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    hf = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    names = set(getattr(hf, "_no_split_modules", None) or [])
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError("cannot find the decoder layers of this model (it names no _no_split_modules)")
    return layers


def compile_blocks(model) -> None:
    """`torch_compile`: compile each decoder block in place, once the strategy has wrapped the model (blocks,
    as torchtitan does: the same code for every layer, so one compilation serves them all)."""
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)  # padding-free and packed rows change length every step


def write_model_description(inner, path: Path) -> None:
    """config.json (and a LoRA run's adapter_config.json) beside shards that are not a Hugging Face folder, so
    that `lf-dist export` can rebuild the model offline."""
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    base.config.save_pretrained(path)
    if hasattr(inner, "peft_config"):
        inner.peft_config["default"].save_pretrained(path)


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off for the block, the model's own mode after it."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def add_metrics(into: dict, metrics: dict) -> None:
    """Sum a micro-batch's (sum, count) metric pairs into `into`."""
    for key, value in metrics.items():
        into[key] = into[key] + value if key in into else value


class Strategy(ABC):
    """Owns processes, device placement, wrapping, forward/backward/step, reductions and checkpoint formats.

    Knows nothing about losses: the loop hands it a step's micro-batches and the stage's loss function.
    Reductions and data shards are over the data-parallel group (`dp_rank`, `dp_size`), which is the whole
    world only while there is no tensor or pipeline parallelism.
    """

    checkpoint_format = formats.HF  # what save_checkpoint writes (parallel/formats.py)
    rank = 0
    local_rank = 0
    world_size = 1
    loss_scaling = True  # fp16 runs get a GradScaler here; DeepSpeed scales losses itself

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        if cfg.train.fp16 and device.type != "cuda":
            raise UserError("fp16: needs a CUDA GPU (loss scaling); use bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.fp16 and self.loss_scaling else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    # -- model creation and wrapping --------------------------------------------------------------------
    quantizes_at_load = True  # a 4/8-bit base is loaded quantized by bitsandbytes (else the strategy quantizes it)

    def load_dtype(self) -> torch.dtype | None:
        """dtype to load the trained model's weights in; None keeps the config's compute dtype."""
        return None

    def frozen_dtype(self) -> torch.dtype | None:
        """dtype to load a frozen model (a reference) in."""
        return self.load_dtype()

    def create_model(self, factory):
        """`factory(meta: bool)` builds the fine-tuning model; sharded strategies build it on meta on most ranks."""
        return factory(False)

    @abstractmethod
    def setup(self, model, build_optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Place and wrap the model; `build_optimizer(model)` makes its optimizer over trainable parameters."""

    def unwrap(self, model) -> torch.nn.Module:
        return model

    def place(self, model) -> torch.nn.Module:
        """On this process's device; a quantized (bitsandbytes) model was loaded there and cannot move."""
        if quantized_params(model):
            return model
        return model.to(self.device)

    def prepare_frozen(self, factory) -> torch.nn.Module:
        """A frozen, never-trained model (a reference, say) from `factory(meta)`, placed like the policy:
        by default a full copy on this process's device."""
        model = self.place(factory(False))
        return model.requires_grad_(False).eval()

    # -- one step -----------------------------------------------------------------------------------
    def autocast(self):
        """bf16/fp16 autocast for the forward pass when the config asks for it."""
        training_args = self.cfg.train
        if training_args.bf16 or training_args.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if training_args.bf16 else torch.float16)
        return contextlib.nullcontext()

    def no_sync(self, model, last_micro_batch: bool):
        """Skip gradient reduction on all but the last micro-batch of a step (where the backend allows)."""
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def forward_backward(self, model, micro_batches: list[dict], stage_loss, n_units: int):
        """Forward and backward of every micro-batch of one optimizer step: `stage_loss.forward(model, batch)`
        gives the outputs, `stage_loss.loss(outputs, batch)` the batch's summed loss and metrics; each loss is
        divided by the step's global unit count `n_units`. Returns the summed loss (detached) and metrics. A
        backend with its own schedule (pipeline stages between forward and loss) overrides this."""
        loss_sum = torch.zeros((), device=self.device)
        metrics: dict = {}
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            with self.no_sync(model, i == len(micro_batches) - 1), self.autocast():
                loss, batch_metrics = stage_loss.loss(stage_loss.forward(model, batch), batch)
            self.backward(loss / max(n_units, 1))
            loss_sum += loss.detach()
            add_metrics(metrics, batch_metrics)
        return loss_sum, metrics

    def forward_only(self, model, batch: dict, forward):
        """`forward(model, batch)` without gradients, placed and cast as in training: evaluation, a reference's
        log-probs, scoring. Every rank of a sharded model calls it the same number of times."""
        with torch.no_grad(), self.autocast():
            return forward(model, self.to_device(batch))

    def generate(self, model, prompts: dict, **gen) -> torch.Tensor:
        """Completions of left-padded `prompts` (input_ids, attention_mask) from the weights being trained, without
        gradients; `gen` are transformers' generation arguments. Returns prompt + completion ids, as `generate`
        does. A sharded backend makes its weights whole for the call (or keeps its ranks in step), so ranks whose
        completions end at different lengths never wait on each other."""
        with torch.no_grad(), self.autocast(), _eval_mode(model):
            return self.unwrap(model).generate(**self.to_device(prompts), **gen)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already normalized by the step's global unit count."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    # a step with a non-finite gradient norm leaves the weights unchanged (DeepSpeed's engine applies it)
    skips_nonfinite_steps = True

    def step(self, model, optimizer, max_grad_norm: float) -> float:
        """Clip gradients, apply the optimizer (skipped by fp16 loss scaling on overflow, and when the norm is
        not finite), zero the gradients; returns the pre-clip grad norm."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        elif math.isfinite(value):  # the norm is global: every rank skips the same non-finite steps
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    # -- collectives over the data-parallel group --------------------------------------------------------
    def all_reduce_sum(self, value):
        return value

    def gather(self, value: float) -> list[float]:
        """One number from every data-parallel rank, in rank order."""
        return [value]

    def gather_objects(self, value) -> list:
        """A picklable object from every data-parallel rank, in rank order (logs, not tensors)."""
        return [value]

    def barrier(self) -> None:  # noqa: B027 - a no-op on one process
        pass

    # -- checkpoints and export ---------------------------------------------------------------------------
    def check_resumable(self, path: Path) -> None:
        """Refuse (UserError) a checkpoint this strategy cannot load, reading only its format's marker files."""
        formats.check_resumable(path, self.checkpoint_format, self.world_size, self.cfg.train.strategy)

    @abstractmethod
    def save_checkpoint(self, model, optimizer, scheduler, tokenizer, path: Path, save_only_model: bool) -> None:
        """Everything needed to resume, written by every rank that holds a part of it."""

    @abstractmethod
    def load_checkpoint(self, model, optimizer, scheduler, path: Path) -> None: ...

    def save_scaler(self, path: Path) -> None:
        if self.scaler and self.is_main:
            torch.save(self.scaler.state_dict(), Path(path) / "scaler.pt")

    def load_scaler(self, path: Path) -> None:
        if self.scaler and (Path(path) / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(Path(path) / "scaler.pt", weights_only=True))

    @abstractmethod
    def export(self, model, tokenizer, path: Path) -> None:
        """The final model in Hugging Face format (adapter or full weights) plus the tokenizer."""

    def finish_export(self, path: Path) -> None:
        """Rank 0, once `export` has written the final model in `path`: a PiSSA adapter converted into a LoRA
        adapter of the original base beside it (`pissa_convert`, as LLaMA-Factory's PissaConvertCallback)."""
        if self.is_main and self.cfg.finetuning.pissa_init and self.cfg.finetuning.pissa_convert:
            from lf_dist.model import pissa

            pissa.convert_saved(Path(path))

    def memory_allocated(self) -> int:
        """Memory in use now: CUDA's allocated bytes, or the process's RSS on a CPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        try:
            with open("/proc/self/statm", encoding="utf-8") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):  # not Linux
            return 0

    def max_memory_allocated(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        # Peak RSS on a CPU: this process image's high-water mark (VmHWM starts afresh at exec), not ru_maxrss,
        # which Linux carries over from the parent that forked it (a run started by a large process reported the
        # parent's size)
        try:
            with open("/proc/self/status", encoding="utf-8") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):  # not Linux
            pass
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except ImportError:  # Windows
            return 0

    def teardown(self) -> None:  # noqa: B027 - a no-op on one process
        pass
