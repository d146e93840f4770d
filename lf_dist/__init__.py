"""lf-dist: run LLaMA-Factory fine-tuning configs at any scale with one training loop."""

__version__ = "0.1.0"
