"""Datasets: dataset_info.json registry → load → align → template → tokenize → (split) → pack → collate.

What a stage's rows look like is its data kind (`kinds.py`); data/ imports nothing of train/ or parallel/.
"""

from lf_dist.data.collator import Collator
from lf_dist.data.kinds import FEEDBACK, PAIRWISE, SUPERVISED, TEXT, DataKind
from lf_dist.data.pipeline import build_datasets

__all__ = ["FEEDBACK", "PAIRWISE", "SUPERVISED", "TEXT", "Collator", "DataKind", "build_datasets"]
