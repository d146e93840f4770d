"""strategy megatron: megatron-core's tensor, pipeline and data parallelism behind the Strategy interface.

`settings.py` reads the config's megatron keys and refuses what cannot run (no megatron-core import);
`model_map.py` maps a Hugging Face config to megatron-core's GPTModel, `weights.py` its weights both ways,
`lora.py` tensor-parallel LoRA (`lora_peft.py` its peft adapter), `steps.py` a step through megatron-core's
schedules, `strategy.py` the Strategy and `checkpoint.py` its torch_dist checkpoints and export.
"""
