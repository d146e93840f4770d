"""do_predict's text similarity scores, as LLaMA-Factory computes them (train/sft/metric.py, ComputeSimilarity).

Per example: ROUGE-1/2/L F-scores (rouge-chinese) over jieba's words joined by spaces, 0 when either side has no
word; BLEU-4 (nltk's sentence_bleu, smoothing method 3) over characters; each ×100 rounded to 4 places, then
averaged. The libraries are the optional `[predict]` extra, imported only when scores are computed.
"""

from __future__ import annotations

import importlib.util
import warnings

from lf_dist.errors import UserError

LIBRARIES = {"nltk": "nltk", "jieba": "jieba", "rouge_chinese": "rouge-chinese"}
KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def require() -> None:
    """A UserError (one line) unless the scoring libraries are installed: checked before anything is trained."""
    missing = [pip for module, pip in LIBRARIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"do_predict: scoring predictions needs {', '.join(missing)}; pip install 'lf-dist[predict]'")


def _libraries():
    require()
    import logging

    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter says nothing to a user
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def example_scores(pred: str, label: str, libraries=None) -> dict[str, float]:
    """One prediction against its reference: {bleu-4, rouge-1, rouge-2, rouge-l}, each ×100, rounded to 4."""
    jieba, Rouge, sentence_bleu, SmoothingFunction = libraries or _libraries()
    hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        rouge = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    scores = {k: round(v["f"] * 100, 4) for k, v in rouge.items()}
    with warnings.catch_warnings():  # nltk warns for every n-gram order without a match; the score stands
        warnings.simplefilter("ignore")
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def similarity(preds: list[str], labels: list[str]) -> dict[str, float]:
    """The mean of each score over the examples (LLaMA-Factory's names, without the split's prefix)."""
    import numpy as np

    libraries = _libraries()
    per_example = {key: [] for key in KEYS}
    for pred, label in zip(preds, labels, strict=True):
        for key, value in example_scores(pred, label, libraries).items():
            per_example[key].append(value)
    return {key: float(np.mean(values)) if values else 0.0 for key, values in per_example.items()}
