"""The datasets of a dataset_dir (its dataset_info.json) and a preview of their first records as the run's
template renders them: the prompt part and the answer part (the tokens a supervised stage trains on)."""

from __future__ import annotations

from lf_dist.data.converters import convert
from lf_dist.data.registry import get_dataset_attrs, load_registry
from lf_dist.errors import UserError


def dataset_names(dataset_dir: str) -> list[dict]:
    """Every registered dataset: name, formatting, whether it holds pairs (ranking) and where it comes from."""
    registry = load_registry(dataset_dir)
    return [
        {
            "name": name,
            "formatting": entry.get("formatting", "alpaca"),
            "ranking": bool(entry.get("ranking", False)),
            "source": "hub" if any(k in entry for k in ("hf_hub_url", "ms_hub_url", "om_hub_url")) else "file",
        }
        for name, entry in registry.items()
        if isinstance(entry, dict)
    ]


def _first_records(attr, count: int) -> list[dict]:
    from lf_dist.data.loader import load_raw

    if attr.load_from != "file":
        raise UserError(
            f"dataset '{attr.name}' is on a hub: the preview reads local files only (training downloads it)"
        )
    raw = load_raw(attr)
    return [convert(raw[i], attr) for i in range(min(count, len(raw)))]


def preview(cfg, count: int = 3) -> list[dict]:
    """The first `count` records of each dataset of `cfg`, rendered by its template and tokenizer."""
    from lf_dist.data.tokenize import encode_turns
    from lf_dist.serve.export import load_tokenizer_and_template

    attrs = get_dataset_attrs(cfg.data.dataset, cfg.data.dataset_dir)
    if not attrs:
        raise UserError("dataset: choose at least one dataset to preview")
    tokenizer, template = load_tokenizer_and_template(cfg)
    out = []
    for attr in attrs:
        for record in _first_records(attr, count):
            response = record["_response"][:1] or [{"role": "assistant", "content": ""}]
            pairs = encode_turns(
                template, tokenizer, [record["_prompt"]], [response], [record["_system"]], [record["_tools"]]
            )[0]
            prompt_ids = [i for source, target in pairs[:-1] for i in source + target] + pairs[-1][0]
            out.append(
                {
                    "dataset": attr.name,
                    "prompt": tokenizer.decode(prompt_ids),
                    "answer": tokenizer.decode(pairs[-1][1]),
                    "tokens": len(prompt_ids) + len(pairs[-1][1]),
                }
            )
    return out
