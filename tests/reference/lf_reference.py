"""Run LLaMA-Factory's own data pipeline (inside its separate venv) and dump what it produces.

Usage (with the reference venv's python): python lf_reference.py jobs.json
jobs.json: {"model": dir, "dataset_dir": dir, "out": dir, "jobs": [{"name", "template", "dataset", "cutoff_len",
            "stage", "extra": {...}}]}
For each job LLaMA-Factory writes its tokenized dataset to out/<name> (its `tokenized_path` feature) and this
script also writes out/<name>.json with the rows of every split, so the comparison needs no shared datasets
version. Only LLaMA-Factory's public entry points are called; nothing of it is copied into lf-dist.
"""

import copy
import json
import shutil
import sys
import time
from pathlib import Path

COLUMNS = (
    "input_ids",
    "attention_mask",
    "labels",
    "kto_tags",
    *(f"{side}_{c}" for side in ("chosen", "rejected") for c in ("input_ids", "attention_mask", "labels")),
)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data import template as lf_template
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    pristine = copy.deepcopy(lf_template.TEMPLATES)  # LLaMA-Factory edits its global templates in place
    out = Path(spec["out"])
    for job in spec["jobs"]:
        lf_template.TEMPLATES.clear()
        lf_template.TEMPLATES.update(copy.deepcopy(pristine))
        shutil.rmtree(out / job["name"], ignore_errors=True)  # else LLaMA-Factory loads the old one
        args = {
            "model_name_or_path": spec["model"],
            "stage": job.get("stage", "sft"),
            "do_train": True,
            "finetuning_type": "lora",
            "dataset": job["dataset"],
            "dataset_dir": spec["dataset_dir"],
            "template": job["template"],
            "cutoff_len": job["cutoff_len"],
            "output_dir": str(out / "run"),
            "overwrite_output_dir": True,
            "tokenized_path": str(out / job["name"]),
            "report_to": "none",
            "per_device_train_batch_size": 1,
            "use_cpu": True,
            **job.get("extra", {}),
        }
        args = {k: v for k, v in args.items() if v is not None}
        model_args, data_args, training_args, _, _ = get_train_args(args)
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        if template.mm_plugin.__class__.__name__ != "BasePlugin":
            # Multimodal templates (gemma3) insist on an image processor even for text-only data; the text path
            # is the base plugin's, so use it: the tiny model has no processor.
            from llamafactory.data.mm_plugin import get_mm_plugin

            template.mm_plugin = get_mm_plugin(name="base")
        start = time.perf_counter()
        module = get_dataset(template, model_args, data_args, training_args, stage=args["stage"], **tokenizer_module)
        seconds = time.perf_counter() - start
        rows = {}
        for split, key in (("train", "train_dataset"), ("validation", "eval_dataset")):
            ds = module.get(key)
            if ds is not None:
                cols = [c for c in COLUMNS if c in ds.column_names]
                rows[split] = {c: [x if isinstance(x, bool) else list(x) for x in ds[c]] for c in cols}
        result = {"rows": rows, "seconds": seconds}
        (out / f"{job['name']}.json").write_text(json.dumps(result), encoding="utf-8")
        print(f"done {job['name']} in {seconds:.2f}s", flush=True)


if __name__ == "__main__":
    main()
