"""ppo's value head in a trained model's folder: moved out of the weights into value_head.safetensors.

The exported policy is then a plain causal LM (or LoRA adapter) that `lf-dist chat`, `export` and any Hugging Face
loader read without unexpected tensors, and the value head sits where LLaMA-Factory writes it, under TRL's names
(`v_head.summary.weight`, `v_head.summary.bias`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lf_dist.model.heads import VALUE_HEAD_FILE

_KEY = "v_head."


def _plain_name(key: str) -> str:
    """`base_model.model.v_head.modules_to_save.default.summary.weight` → `v_head.summary.weight`."""
    tail = key[key.index(_KEY) + len(_KEY) :]
    for wrapper in ("modules_to_save.default.", "original_module."):
        tail = tail.replace(wrapper, "")
    return _KEY + tail


def split_value_head(folder: Path) -> bool:
    """Move every `v_head` tensor of the safetensors files in `folder` into value_head.safetensors (updating a
    shard index and a LoRA adapter's modules_to_save); False when there is none."""
    from safetensors.torch import load_file, save_file

    folder, found = Path(folder), {}
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != VALUE_HEAD_FILE)
    for path in files:
        tensors = load_file(str(path))
        heads = {k: v for k, v in tensors.items() if _KEY in k}
        if not heads:
            continue
        for key, value in heads.items():
            if "original_module." not in key:  # peft keeps an untrained copy beside the trained one
                found[_plain_name(key)] = value.contiguous()
        save_file({k: v.contiguous() for k, v in tensors.items() if k not in heads}, str(path), {"format": "pt"})
    if not found:
        return False
    save_file(found, str(folder / VALUE_HEAD_FILE), {"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if _KEY not in k}
        index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        config = json.loads(adapter.read_text(encoding="utf-8"))
        kept = [m for m in config.get("modules_to_save") or [] if m != "v_head"]
        config["modules_to_save"] = kept or None
        adapter.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return True
