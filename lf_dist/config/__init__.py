"""Read LLaMA-Factory style YAML/JSON configs into one typed RunConfig, checked key by key.

config/ imports nothing of the package but `lf_dist.errors`: everyone reads the config, it reads no one.
"""

from lf_dist.config.loader import read_config
from lf_dist.config.schema import DataArgs, FinetuningArgs, LaunchArgs, ModelArgs, RunConfig, TrainArgs

__all__ = ["DataArgs", "FinetuningArgs", "LaunchArgs", "ModelArgs", "RunConfig", "TrainArgs", "read_config"]
