"""Datasets: dataset_info.json registry → load → align → template → tokenize → (split) → collate."""

from lf_dist.data.collator import Collator
from lf_dist.data.pipeline import build_datasets

__all__ = ["Collator", "build_datasets"]
