"""MegatronStrategy: megatron-core's GPTModel, DDP and optimizer behind lf-dist's Strategy interface.

Set up in torchtitan's order, each step one function: the parallel groups (`_init_groups`), this rank's model
chunks from the Hugging Face config and its own weight shards (`create_model`), LoRA on the parallel linears,
megatron-core's DDP around each chunk, then its optimizer (`setup`). The loop is lf-dist's: its scheduler moves
the learning rate in the optimizer's parameter groups, its clipping and non-finite-step guard run in `step`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch

from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.parallel import formats
from lf_dist.parallel.distributed import DistributedStrategy
from lf_dist.parallel.megatron import runtime, steps
from lf_dist.parallel.megatron.settings import Layout, distributed_optimizer

logger = get_logger(__name__)


class Chunks(torch.nn.ModuleList):
    """This rank's model: one chunk per virtual pipeline stage, each in megatron-core's DDP."""


class OptimizerView(torch.optim.Optimizer):
    """megatron-core's optimizer as lf-dist's scheduler sees it: the same parameter groups (where the learning rate
    is set), and `step` for the update itself."""

    def __init__(self, inner):  # no super().__init__: the groups are the inner optimizer's own
        self.inner = inner
        self.defaults, self.state = {}, {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = OrderedDict(), OrderedDict()

    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    def step(self, closure=None):
        return self.inner.step_with_ready_grads()

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)


class MegatronStrategy(DistributedStrategy):
    """Tensor, pipeline and data parallelism with megatron-core. Reductions and data shards are over the
    data-parallel group; every rank of one pipeline reads the same micro-batches."""

    checkpoint_format = formats.MEGATRON
    loss_scaling = False

    def __init__(self, cfg):
        device = runtime.device()
        if device is None:
            raise UserError("strategy megatron: megatron-core's layers need CUDA GPUs and this machine has none")
        if cfg.train.fp16:
            raise UserError("fp16: strategy megatron trains in bf16 or fp32; use bf16")
        super().__init__(cfg)
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.layout = Layout.of(cfg, self.world_size)
        self._init_groups()
        if self.is_main:
            logger.info(self.layout.describe(cfg))

    def _init_groups(self) -> None:
        from megatron.core import parallel_state, tensor_parallel

        layout = self.layout
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(self.cfg.train.seed)
        self.dp_group = parallel_state.get_data_parallel_group()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    # -- the model -------------------------------------------------------------------------------------
    def load_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.train.bf16 else torch.float32

    def transformer_config(self, hf_config):
        from lf_dist.parallel.megatron.model_map import transformer_config

        t, layout, dtype = self.cfg.train, self.layout, self.load_dtype()
        return transformer_config(
            hf_config,
            tp=layout.tp,
            pp=layout.pp,
            vpp=layout.vpp,
            cp=layout.cp,
            sequence_parallel=t.sequence_parallel,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            pipeline_dtype=dtype,
            calculate_per_token_loss=True,
            # interleaved stages of two ranks send to the same peer both ways at once: batched sends would pair a
            # gradient with an activation of the same shape, so each direction gets its own group (Megatron-LM's
            # choice for interleaving)
            overlap_p2p_comm=bool(layout.vpp),
            batch_p2p_comm=not layout.vpp,
            recompute_granularity=t.recompute_granularity,
            recompute_method=t.recompute_method,
            recompute_num_layers=t.recompute_num_layers,
        )

    def create_model(self, factory):
        """This rank's chunks, built from the Hugging Face config and filled with this rank's own shards of the
        weights (`factory`, the Hugging Face recipe, is not used: megatron-core builds its own layers)."""
        from transformers import AutoConfig

        from lf_dist.model.loader import model_folder
        from lf_dist.parallel.megatron.model_map import build_model_chunks
        from lf_dist.parallel.megatron.weights import load_hf_weights

        folder = model_folder(self.cfg)
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=self.cfg.model.trust_remote_code)
        self.hf_config, self.tconfig = hf_config, self.transformer_config(hf_config)
        chunks = build_model_chunks(hf_config, self.tconfig, use_te=runtime.has_transformer_engine())
        for chunk in chunks:
            chunk.to(self.device)
        load_hf_weights(chunks, hf_config, folder, te=runtime.has_transformer_engine())
        if self.cfg.finetuning.finetuning_type == "lora":
            self._apply_lora(chunks)
        return chunks

    def _apply_lora(self, chunks) -> None:
        """LoRA on the parallel linears: new adapters, or those of `adapter_name_or_path` (a peft adapter whose
        fused groups share lora_A, as this backend exports them), with that adapter's own rank and targets."""
        from lf_dist.parallel.megatron.lora import apply_lora, megatron_lora_targets, resolve_targets
        from lf_dist.parallel.megatron.lora_peft import load_peft_adapter

        f, seed = self.cfg.finetuning, self.cfg.train.seed
        if not self.cfg.model.adapter_name_or_path:
            self.lora = (megatron_lora_targets(f.lora_target), f.lora_rank, f.lora_alpha, f.lora_dropout, f.use_rslora)
            apply_lora(chunks, *self.lora, seed)
            return
        from peft import PeftConfig
        from safetensors.torch import load_file

        from lf_dist.model.hub import local_model

        folder = Path(local_model(self.cfg.model.adapter_name_or_path, self.cfg.model, "adapter_name_or_path"))
        saved = PeftConfig.from_pretrained(folder)
        targets = resolve_targets(sorted(saved.target_modules))
        self.lora = (targets, saved.r, saved.lora_alpha, saved.lora_dropout, bool(saved.use_rslora))
        apply_lora(chunks, *self.lora, seed)
        load_peft_adapter(chunks, self.hf_config, load_file(str(folder / "adapter_model.safetensors")))

    def setup(self, chunks, build_optimizer):
        """megatron-core's DDP around each chunk, then its optimizer (`build_optimizer`, torch's AdamW for the
        other backends, is not used)."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t, dist_opt = self.cfg.train, distributed_optimizer(self.cfg, self.layout)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=t.overlap_grad_reduce,
            overlap_param_gather=t.overlap_param_gather,
            use_distributed_optimizer=dist_opt,
        )
        wrapped = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        if t.overlap_grad_reduce:
            self.tconfig.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
            self.tconfig.grad_sync_func = [m.start_grad_sync for m in wrapped]
        if t.overlap_param_gather:
            self.tconfig.param_sync_func = [m.start_param_sync for m in wrapped]
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.learning_rate,
                weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1,
                adam_beta2=t.adam_beta2,
                adam_eps=t.adam_epsilon,
                clip_grad=0.0,  # lf-dist clips in `step`, after its non-finite check
                bf16=t.bf16,
                params_dtype=self.load_dtype(),
                use_distributed_optimizer=dist_opt,
            ),
            wrapped,
        )
        return Chunks(wrapped), OptimizerView(optimizer)

    def unwrap(self, model):
        return model

    # -- one step ------------------------------------------------------------------------------------
    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # megatron's layers run in the parameters' dtype

    def forward_backward(self, model, micro_batches, stage_loss, n_units):
        """The step's micro-batches through megatron-core's schedule: the stage's loss on the last pipeline stage,
        gradients divided by the step's global label-token count in `finalize_model_grads` (`n_units`, the
        same count, is what the loop reports the loss by)."""
        for chunk in model:
            chunk.zero_grad_buffer()
        multiple = self.layout.tp if self.cfg.train.sequence_parallel else 1
        vocab = self.hf_config.vocab_size
        loss_sum = steps.run_schedule(list(model), micro_batches, stage_loss, self.device, vocab, multiple)
        return loss_sum, {}

    def forward_only(self, model, batch, forward):
        """Evaluation: the label tokens' log-probs, computed by megatron-core (the stage's forward is its
        Hugging Face one); every pipeline stage gets them."""
        with torch.no_grad():
            return steps.label_logps(list(model), batch, self.device, self.hf_config.vocab_size)

    def generate(self, model, prompts, **gen):
        raise UserError("strategy megatron does not generate; use fsdp2 for stages that do")

    def step(self, model, optimizer, max_grad_norm: float) -> float:
        """The gradient norm over every tensor- and pipeline-parallel shard; the update is skipped where it is not
        finite, clipped to `max_grad_norm` otherwise."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        inner = optimizer.inner
        found_inf = inner.prepare_grads()
        norm = float(inner.get_grad_norm())
        if not found_inf and math.isfinite(norm):
            if max_grad_norm > 0:
                clip_grad_by_total_norm_fp32(inner.get_parameters(), max_grad_norm, norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # -- checkpoints and export ---------------------------------------------------------------------
    def save_checkpoint(self, model, optimizer, scheduler, tokenizer, path, save_only_model):
        from lf_dist.parallel.megatron import checkpoint

        checkpoint.save(self, model, optimizer, scheduler, tokenizer, path, save_only_model)

    def load_checkpoint(self, model, optimizer, scheduler, path):
        from lf_dist.parallel.megatron import checkpoint

        self.check_resumable(path)
        checkpoint.load(self, model, optimizer, scheduler, path)

    def export(self, model, tokenizer, path):
        from lf_dist.parallel.megatron import checkpoint

        checkpoint.export(self, model, tokenizer, path)

    def teardown(self) -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        super().teardown()
