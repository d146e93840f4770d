"""Read LLaMA-Factory style YAML/JSON configs into one typed, validated RunConfig."""

from lf_dist.config.loader import load_config
from lf_dist.config.schema import DataArgs, FinetuningArgs, ModelArgs, RunConfig, TrainArgs

__all__ = ["DataArgs", "FinetuningArgs", "ModelArgs", "RunConfig", "TrainArgs", "load_config"]
