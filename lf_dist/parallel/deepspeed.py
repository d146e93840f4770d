"""DeepSpeed ZeRO (stages 0-3, optional offload) from a LLaMA-Factory style ds_config.json.

"auto" values are filled from the run config, as the Hugging Face integration does. Under ZeRO-3 the policy and
every frozen model are built inside `deepspeed.zero.Init` (transformers' ZeRO-3 loading): each parameter is
partitioned as it is created, so no rank ever holds the whole model. DeepSpeed runs in its
unmanaged gradient-accumulation mode: `backward` only accumulates locally and `step` reduces and updates once
per optimizer step, so it follows the same loop (and the same token normalization) as every other strategy.
A checkpoint resumes on any world size: on another than the one that wrote it, through DeepSpeed's universal
checkpoint (ds_universal.py).
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

import torch

from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.parallel import ds_universal
from lf_dist.parallel.base import write_model_description
from lf_dist.parallel.distributed import DistributedStrategy
from lf_dist.parallel.formats import DEEPSPEED, record_world
from lf_dist.parallel.single import is_peft

TAG = DEEPSPEED.marker  # the engine's checkpoint tag: its folder marks the format
logger = get_logger(__name__)


def read_ds_config(value) -> dict:
    if isinstance(value, dict):
        return json.loads(json.dumps(value))
    path = Path(value)
    if not path.is_file():
        raise UserError(f"deepspeed: config file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"deepspeed: {path} is not valid JSON (line {err.lineno}: {err.msg})") from None


def fill_auto(ds: dict, cfg, dp_size: int, hidden_size: int) -> dict:
    """Replace "auto" with values from the run config (Hugging Face's rules for the same keys)."""
    training_args = cfg.train
    fills = {
        "train_micro_batch_size_per_gpu": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "train_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * dp_size,
        "gradient_clipping": training_args.max_grad_norm,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key, enabled in (("bf16", training_args.bf16), ("fp16", training_args.fp16)):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", "auto") == "auto":
            ds[key]["enabled"] = enabled
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise UserError(f"deepspeed: cannot fill 'auto' for {', '.join(leftover)}")
    ds["managed_gradient_accumulation"] = False
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


@contextlib.contextmanager
def zero3_init(ds_config: dict):
    """Models built in this block are created inside `deepspeed.zero.Init` with `ds_config` and loaded
    partitioned (peft's adapters, added after the base is loaded, are ordinary parameters that the engine
    partitions): transformers does so while an `HfDeepSpeedConfig` is alive (a module-level weak
    reference). It is dropped on the way out, so no later model of this process (another strategy's, another
    run's in the same process) is partitioned by accident."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import deepspeed as hf_deepspeed

    # as deepspeed.initialize does (it adopts the existing process group): zero.Init reads the world size from it
    deepspeed.init_distributed(get_accelerator().communication_backend_name())
    hf_config = hf_deepspeed.HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        if hasattr(hf_deepspeed, "unset_hf_deepspeed_config"):
            hf_deepspeed.unset_hf_deepspeed_config()
        del hf_config  # with the last reference gone, the weak reference reads None on any transformers version


def _hidden_size(cfg) -> int:
    """The model's hidden size, from its config.json (the "auto" bucket sizes need it before the model exists)."""
    from transformers import AutoConfig

    from lf_dist.model.loader import model_folder

    model_args = cfg.model
    config = AutoConfig.from_pretrained(
        model_folder(cfg), trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None) or 1024


def _cast_unpartitioned(model, ds_config: dict) -> None:
    """The engine casts a model's parameters to bf16/fp16 itself, unless zero.Init built it (then it takes them as
    cast already): the parameters made after zero.Init (LoRA's, peft's modules_to_save copies) are cast here as
    the engine would have, so no fp32 weight meets a bf16 activation (DeepSpeed runs without autocast)."""
    if (ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled"):
        dtype = torch.bfloat16
    elif (ds_config.get("fp16") or {}).get("enabled"):
        dtype = torch.float16
    else:
        return
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and not hasattr(param, "ds_id"):
            param.data = param.data.to(dtype)


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


class DeepSpeedStrategy(DistributedStrategy):
    checkpoint_format = DEEPSPEED
    loss_scaling = False  # DeepSpeed's fp16 config scales the loss itself

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ds_config = read_ds_config(cfg.train.deepspeed or {"zero_optimization": {"stage": 2}})
        self.engine = None
        self.frozen_engines: list = []

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module itself when bf16/fp16 is enabled

    def create_model(self, factory):
        """Under ZeRO-3 the policy is built partitioned (inside zero.Init, with the run's filled config); LoRA's
        adapters, created afterwards, are ordinary parameters that `deepspeed.initialize` partitions."""
        if self.zero_stage != 3:
            return factory(False)
        with zero3_init(fill_auto(self.ds_config, self.cfg, self.dp_size, _hidden_size(self.cfg))):
            return factory(False)

    def setup(self, model, build_optimizer):
        import deepspeed

        hidden = getattr(getattr(model, "config", None), "hidden_size", 1024)
        config = fill_auto(self.ds_config, self.cfg, self.dp_size, hidden)  # a no-op where create_model filled it
        if self.zero_stage == 3:
            _cast_unpartitioned(model, config)
        optimizer = build_optimizer(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if self.zero_stage in (1, 2):  # so its checkpoints convert to, and it loads, a universal checkpoint
            ds_universal.link_round_robin(self.engine.optimizer)
        # The LR schedule acts on the wrapped torch optimizer's param groups, which DeepSpeed reads each step.
        return self.engine, optimizer

    def unwrap(self, model):
        return model.module if hasattr(model, "module") else model

    def prepare_frozen(self, factory):
        """Under ZeRO-3 a frozen model is built partitioned (inside zero.Init) and run by an optimizer-less engine
        (as TRL prepares its reference); below stage 3 every rank holds a full frozen copy, as it does of the
        policy's weights."""
        if self.zero_stage != 3:
            return super().prepare_frozen(factory)
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": self.cfg.train.per_device_train_batch_size,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": self.cfg.train.bf16},
            "fp16": {"enabled": self.cfg.train.fp16},
            "steps_per_print": 10**9,
        }
        if getattr(factory, "loads_whole", False):  # partitioned by initialize() after a whole load on each rank
            model = factory(False).requires_grad_(False)
        else:
            with zero3_init(config):
                model = factory(False).requires_grad_(False)
        engine, _, _, _ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval() does not return the engine
        self.frozen_engines.append(engine)
        return engine

    def generate(self, model, prompts, **gen):
        """Under ZeRO-3 the weights are gathered once for the call and the engine's gathering hooks are off
        meanwhile (DeepSpeed's own `unwrap_model_for_generation`): no token's forward needs a collective, so a rank
        whose completions end early never waits for the others. Below stage 3 the weights are whole already."""
        if self.zero_stage != 3:
            return super().generate(model, prompts, **gen)
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine):
            return super().generate(model, prompts, **{**gen, "synced_gpus": False})

    def teardown(self) -> None:
        """Engines release their ZeRO hooks and buffers before the process group goes: left to interpreter
        shutdown, a rank sometimes aborted after finishing ("terminate called without an active exception")."""

        for engine in (*self.frozen_engines, self.engine):
            if engine is not None and hasattr(engine, "destroy"):
                engine.destroy()
        self.engine, self.frozen_engines = None, []
        gc.collect()
        super().teardown()

    def backward(self, loss):
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)

    skips_nonfinite_steps = False  # the engine applies what it computed (its fp16 overflow check aside)

    def step(self, model, optimizer, max_grad_norm):
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save_checkpoint(self, model, optimizer, scheduler, tokenizer, path, save_only_model):
        self.engine.save_checkpoint(str(path), tag=TAG, exclude_frozen_parameters=True)
        if self.is_main:
            tokenizer.save_pretrained(path)
            write_model_description(self.unwrap(model), Path(path))
            torch.save(scheduler.state_dict(), Path(path) / "scheduler.pt")
            record_world(path, DEEPSPEED, self.world_size)  # read before anything is loaded, to refuse early

    def load_checkpoint(self, model, optimizer, scheduler, path):
        self.check_resumable(path)
        saved = ds_universal.saved_world(path, DEEPSPEED.world_file, TAG)
        if saved in (None, self.world_size) or not ds_universal.partitioned(path, TAG):
            self.engine.load_checkpoint(str(path), tag=TAG, load_module_strict=False)
        else:
            self._load_universal(optimizer, Path(path), saved)
        scheduler.load_state_dict(torch.load(Path(path) / "scheduler.pt", weights_only=True))

    def _load_universal(self, optimizer, path: Path, saved: int) -> None:
        """A checkpoint of another world size: rank 0 converts it to DeepSpeed's universal checkpoint (once, see
        ds_universal), then every rank loads its own partitions from that."""
        error = converted = None
        if self.is_main:
            try:
                converted = ds_universal.convert(path, TAG)
            except Exception as err:  # noqa: BLE001 - whatever the converter raises is reported in one line
                error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        error = self.gather_objects(error)[0]  # rank 0's, on every rank
        if error:
            raise UserError(
                f"resume_from_checkpoint: {path.name} was saved on {saved} ranks and DeepSpeed's universal checkpoint "
                f"conversion failed ({error}); resume it on {saved} ranks"
            )
        if self.is_main:
            how = "converted it to" if converted else "using its earlier conversion to"
            logger.info(
                f"notice: {path.name} was saved on {saved} ranks; {how} DeepSpeed's universal checkpoint "
                f"({path.name}/{ds_universal.FOLDER}) to resume on {self.world_size}"
            )
        # the engine reads `load_universal` from its config at load time only: on for this one load
        self.engine._config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(path / ds_universal.FOLDER), tag=TAG, load_module_strict=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if self.zero_stage == 3:
            ds_universal.repair_stage3_load(optimizer, path / ds_universal.FOLDER, TAG)

    def export(self, model, tokenizer, path):
        import deepspeed

        inner = self.unwrap(model)
        adapter = is_peft(inner)
        state = {}
        for name, param in inner.named_parameters():
            if adapter and not param.requires_grad:
                continue
            # one parameter at a time: only rank 0's CPU copy grows to the whole model, no rank's gathered weights
            with deepspeed.zero.GatheredParameters([param], enabled=self.zero_stage == 3):
                if self.is_main:
                    state[name] = param.detach().to("cpu", copy=True)
        if self.is_main and not adapter:  # buffers and tied weights as the module reports them
            state = {**{k: v.cpu() for k, v in inner.state_dict().items() if k not in state}, **state}
        self.write_hf(inner, state, tokenizer, path)
