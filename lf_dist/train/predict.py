"""do_predict: answers generated for the eval set and scored, as LLaMA-Factory's sft stage does with
predict_with_generate.

The prompts are the eval examples' prompts as the template renders them (the prompt data kind: LLaMA-Factory's
unsupervised encoding), the labels their reference answers. Each rank generates a strided shard of them,
`per_device_eval_batch_size` prompts (left-padded) per `generate` call, on the weights the run holds (trained, when
it trained), with the config's generation keys turned into `generate` arguments and generated ids into text by the
chat's own functions (`lf_dist/serve/engine.py`), so an answer here reads as `lf-dist chat` answers that prompt.
The main rank gathers the answers, writes generated_predictions.jsonl in the dataset's order and scores them
(`nlg_metrics`: BLEU-4, ROUGE-1/2/L) into predict_results.json, as Hugging Face's Trainer names them.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path

import torch

from lf_dist.data.kinds import PROMPT
from lf_dist.data.pipeline import build_datasets
from lf_dist.data.templates import stop_token_ids
from lf_dist.log import get_logger
from lf_dist.serve.engine import Sampling, answer_text, generation_kwargs, hidden_ids
from lf_dist.train import nlg_metrics
from lf_dist.train.tracker import RESULTS_FILE

logger = get_logger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"
PREDICT_RESULTS_FILE = "predict_results.json"


def prompt_rows(cfg, tokenizer, template, world_size: int = 1):
    """The eval set's examples as prompt rows (`input_ids`, `answer`): the same records the run evaluates on
    (eval_dataset, or the val_size split, which splits records before encoding and so picks the same ones)."""
    data = {"tokenized_path": None, "packing": False}  # a tokenized_path holds the stage's rows, not prompts
    if cfg.data.eval_dataset:
        data["dataset"] = None  # the eval set alone: no split to make, no train set to encode
    return build_datasets(cfg.replace(data=data), tokenizer, template, PROMPT, world_size=world_size).eval


def answer_ids(ids: list[int], stop_ids: list[int]) -> list[int]:
    """A generated row up to and including the token that ended it (what follows is padding)."""
    stops = set(stop_ids)
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    return ids if end is None else ids[: end + 1]


class Predictor:
    """Built before training (the prompts encoded, the scoring libraries checked: a mistake is one line before
    any work); `run(model)` after it."""

    def __init__(self, cfg, strategy, tokenizer, template):
        nlg_metrics.require()
        self.cfg, self.strategy, self.tokenizer = cfg, strategy, tokenizer
        self.rows = prompt_rows(cfg, tokenizer, template, strategy.world_size)
        self.stop_ids = stop_token_ids(template, tokenizer)
        self.generate_kwargs = {
            **generation_kwargs(Sampling.of(cfg.generation), self.stop_ids, tokenizer),
            "use_cache": True,  # a model set up for training may have turned the cache off
        }
        self.hidden = hidden_ids(tokenizer, template, self.stop_ids, cfg.generation.skip_special_tokens)
        self.collate = PROMPT.make_collator(tokenizer, cfg.data.cutoff_len)

    def run(self, model) -> dict:
        """Generate, gather, write the predictions; the predict_* metrics on the main rank ({} on the others)."""
        n, world = len(self.rows), self.strategy.dp_size
        batch_size = self.cfg.train.per_device_eval_batch_size
        logger.info(f"predicting {n} eval examples ({world} rank(s), {batch_size} per generate call)")
        start = time.perf_counter()
        torch.manual_seed(self.cfg.train.seed)  # sampled answers: the same on a rerun of the same layout
        mine = self._generate(model, batch_size)
        gathered = [item for part in self.strategy.gather_objects(mine) for item in part]
        runtime = time.perf_counter() - start
        if not self.strategy.is_main:
            return {}
        predicts = [text for _, text in sorted(gathered)]
        self._write(Path(self.cfg.train.output_dir) / PREDICTIONS_FILE, predicts)
        scores = nlg_metrics.similarity(predicts, list(self.rows["answer"]))
        steps = math.ceil(n / (batch_size * world))
        return {
            **{f"predict_{k}": v for k, v in scores.items()},
            "predict_runtime": round(runtime, 4),
            "predict_samples_per_second": round(n / runtime, 3),
            "predict_steps_per_second": round(steps / runtime, 3),
        }

    def _generate(self, model, batch_size: int) -> list[tuple[int, str]]:
        """(dataset index, answer) of this rank's shard. Every rank makes the same number of `generate` calls (a
        sharded model gathers its weights for each), a rank out of prompts generating one and dropping it."""
        n, rank, world = len(self.rows), self.strategy.dp_rank, self.strategy.dp_size
        shard = list(range(rank, n, world))
        calls = math.ceil(math.ceil(n / world) / batch_size)
        progress = _Progress(calls, self.strategy.is_main and not self.cfg.train.disable_tqdm)
        out = []
        for c in range(calls):
            indices = shard[c * batch_size : (c + 1) * batch_size]
            batch = self.collate([self.rows[i] for i in indices or [0]])
            prompts = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            output = self.strategy.generate(model, prompts, **self.generate_kwargs)
            new = output[:, batch["input_ids"].shape[1] :].cpu().tolist()
            for i, ids in zip(indices, new):
                out.append((i, answer_text(self.tokenizer, self.hidden, answer_ids(ids, self.stop_ids))))
            progress.update(c + 1)
        progress.close()
        return out

    def _write(self, path: Path, predicts: list[str]) -> None:
        """LLaMA-Factory's save_predictions: the prompt as the model read it (special tokens shown), the answer,
        the reference; one JSON object a line, in the dataset's order."""
        prompts = self.tokenizer.batch_decode(list(self.rows["input_ids"]), skip_special_tokens=False)
        with open(path, "w", encoding="utf-8") as f:
            for prompt, predict, label in zip(prompts, predicts, list(self.rows["answer"]), strict=True):
                f.write(json.dumps({"prompt": prompt, "predict": predict, "label": label}, ensure_ascii=False) + "\n")
        logger.info(f"predictions saved to {path}")


class _Progress:
    """A progress bar on the main rank, or (disable_tqdm) a log line at every tenth of the work."""

    def __init__(self, total: int, bar: bool):
        self.total, self.bar, self.shown = total, None, 0
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="predict", dynamic_ncols=True)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif done * 10 // self.total > self.shown:
            self.shown = done * 10 // self.total
            logger.info(f"predict: {done}/{self.total} generate calls")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def save_results(output_dir: Path, metrics: dict) -> None:
    """predict_results.json, and the metrics merged into all_results.json (Trainer.save_metrics("predict")); the
    closing block on the console."""
    out = Path(output_dir)
    (out / PREDICT_RESULTS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    path = out / RESULTS_FILE
    try:
        merged = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        merged = {}
    path.write_text(json.dumps({**merged, **metrics}, indent=2) + "\n", encoding="utf-8")
    width = max(map(len, metrics))
    lines = ["***** predict metrics *****"]
    for key in sorted(metrics):
        value = metrics[key]
        if key.endswith("_runtime"):
            value = str(datetime.timedelta(seconds=round(value, 2))).rstrip("0").rstrip(".")
        else:
            value = f"{value:.4f}".rstrip("0").rstrip(".")
        lines.append(f"  {key:<{width}} = {value:>10}")
    print("\n".join(lines), flush=True)
