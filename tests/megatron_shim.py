"""Test-only shim that runs megatron-core 0.16.1 layers, schedules, DDP and dist_checkpointing on CPU over gloo.

megatron-core assumes a CUDA device in a handful of places; each patch below names the megatron line that
needs it. Nothing in `lf_dist/` patches torch.cuda: only tests activate this shim.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import types
from datetime import timedelta

import torch

MEGATRON_VERSION = "0.16.1"
_CPU = torch.device("cpu")
_saved: list[tuple[object, str, object]] = []


def _check_version() -> None:
    from megatron.core import __version__

    assert __version__ == MEGATRON_VERSION, (
        f"the shim is written for megatron-core {MEGATRON_VERSION}, not {__version__}"
    )


def _patch(owner, name: str, value) -> None:
    _saved.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _cpu_device(device):
    return _CPU if device is not None and str(device).startswith("cuda") else device


class _TorchWithCpuFactories(types.ModuleType):
    """Stands in for a megatron module's `torch` global: factories map device="cuda" to cpu, the rest is torch."""

    def __init__(self):
        super().__init__("torch")
        for name in ("zeros", "empty", "ones", "full", "tensor"):
            setattr(self, name, self._cpu_factory(getattr(torch, name)))

    @staticmethod
    def _cpu_factory(fn):
        def factory(*args, device=None, **kwargs):
            return fn(*args, device=_cpu_device(device), **kwargs)

        return factory

    def __getattr__(self, name):
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Named CPU generator states standing in for megatron's CudaRNGStatesTracker (same interface)."""

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _with_tensor_cuda_as_identity(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    return wrapper


def activate() -> None:
    """Install the patches (idempotent)."""
    if _saved:
        return
    _check_version()
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer import utils as transformer_utils

    # rotary_pos_embedding.py:162 moves inv_freq to `torch.cuda.current_device()`; utils.py:631 (GlobalMemoryBuffer,
    # sequence-parallel all-gather) and p2p_communication.py:190-321 (pipeline send/recv buffers) allocate on it.
    _patch(torch.cuda, "current_device", lambda: _CPU)
    # random.py:235 `add` seeds through torch.cuda.get_rng_state/manual_seed: the tracker class is swapped for a CPU
    # one (initialize_rng_tracker instantiates the module global) and any tracker already made is dropped.
    _patch(random, "CudaRNGStatesTracker", CpuRNGStatesTracker)
    _patch(random, "_CUDA_RNG_STATE_TRACKER", None)
    _patch(random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    # random.py:447/457 (activation recompute, CheckpointFunction) save and restore the "cuda" RNG state.
    _patch(random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # schedules.py:596/983/2138 `torch.zeros([], dtype=torch.int, device="cuda")` counts tokens per step.
    _patch(schedules, "torch", _TorchWithCpuFactories())
    # transformer/utils.py:35 builds the default causal mask (attention_mask=None) with device="cuda".
    _patch(transformer_utils, "torch", _TorchWithCpuFactories())
    # language_module.py:244 moves the tied output weight of the last pipeline stage with `.cuda()` before the
    # all-reduce that copies the first stage's embedding into it (tie_word_embeddings with pp > 1).
    _patch(
        LanguageModule,
        "setup_embeddings_and_output_layer",
        _with_tensor_cuda_as_identity(LanguageModule.setup_embeddings_and_output_layer),
    )
    # lf_dist's own seam (runtime.py): megatron-core's layers run on this device, None meaning "no CUDA, refuse".
    from lf_dist.parallel.megatron import runtime

    _patch(runtime, "device", lambda: _CPU)
    # p2p_communication.py:242/398 synchronize after batched pipeline send/recv (batch_p2p_sync defaults to True).
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch_optimizer()


def _clip_grads_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grads.py:167 asserts `torch.cuda.FloatTensor` gradients; the same scaling, for CPU ones."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_optimizer() -> None:
    from megatron.core import utils as core_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_module

    # optimizer.py:907 (FP32Optimizer's `_scale`) and :473-485 (found_inf, overflow buffers) use device="cuda";
    # clip_grads.py:90/103/115/174/207 and utils.py:1207 (local_multi_tensor_l2_norm) the same for the norm.
    _patch(optimizer_module, "torch", _TorchWithCpuFactories())
    _patch(clip_grads, "torch", _TorchWithCpuFactories())
    _patch(core_utils, "torch", _TorchWithCpuFactories())
    _patch(clip_grads, "clip_grad_by_total_norm_fp32", _clip_grads_on_cpu)


def deactivate() -> None:
    """Undo every patch, newest first."""
    while _saved:
        owner, name, value = _saved.pop()
        setattr(owner, name, value)


@contextlib.contextmanager
def active():
    """Context manager: the shim is active inside (and left active if it already was)."""
    was_active = bool(_saved)
    activate()
    try:
        yield
    finally:
        if not was_active:
            deactivate()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, cp: int = 1, seed: int = 1234) -> None:
    """Activate the shim, start gloo (from RANK/WORLD_SIZE/MASTER_* when set, as in spawned workers; otherwise a
    one-process world on a free port, leaving the environment alone), megatron's model-parallel groups and its
    RNG tracker. Megatron's groups are rebuilt when already initialised; the process group is kept."""
    activate()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random

    if not torch.distributed.is_initialized():
        timeout = timedelta(seconds=120)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            torch.distributed.init_process_group("gloo", timeout=timeout)
        else:
            url = f"tcp://127.0.0.1:{free_port()}"
            torch.distributed.init_process_group("gloo", init_method=url, rank=0, world_size=1, timeout=timeout)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )
    random.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron's groups and the process group (the shim stays active)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
