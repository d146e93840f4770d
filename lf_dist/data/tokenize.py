"""Tokenize aligned examples into input_ids / labels with LLaMA-Factory's masking and truncation rules."""

from __future__ import annotations

from itertools import chain

from lf_dist.data.converters import convert
from lf_dist.data.template_elements import BOS, EOS, Template, Token

IGNORE_INDEX = -100


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of a length budget between a prompt and its response."""
    if target_len * 2 < cutoff_len:  # short response: truncate the prompt only
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # short prompt: truncate the response only
        max_target_len = cutoff_len - source_len
    else:  # both long: keep their proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


class ElementTokenizer:
    """Turns element lists into ids, sending every string of a batch through the fast tokenizer at once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        # The Rust tokenizer's batch encoder without offsets: the same ids as tokenizer(...), about 2x faster.
        fast = hasattr(backend, "encode_batch_fast") and not getattr(tokenizer, "split_special_tokens", False)
        self._encode = self._fast if fast else self._slow

    def _fast(self, strings: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer._tokenizer.encode_batch_fast(strings, add_special_tokens=False)]

    def _slow(self, strings: list[str]) -> list[list[int]]:
        return self.tokenizer(strings, add_special_tokens=False)["input_ids"]

    def __call__(self, element_lists: list[list]) -> list[list[int]]:
        strings = [e for elements in element_lists for e in elements if isinstance(e, str) and e not in (BOS, EOS, "")]
        # Template pieces (a default system prompt, role headers) repeat across a batch: encode each once.
        unique = list(dict.fromkeys(strings))
        ids_of = dict(zip(unique, self._encode(unique))) if unique else {}
        encoded = (ids_of[s] for s in strings)
        out = []
        for elements in element_lists:
            ids = []
            for e in elements:
                if e == BOS:
                    ids += [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
                elif e == EOS:
                    ids += [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
                elif isinstance(e, Token):
                    ids.append(self.tokenizer.convert_tokens_to_ids(e.name))
                elif e:
                    ids += next(encoded)  # extends this fresh list; shared encodings stay untouched
            out.append(ids)
        return out


def encode_turns(
    template: Template, tokenizer, prompts, responses, systems, tools, discard_history_thought: bool = False
) -> list[list[tuple]]:
    """Token id pairs (prompt, response) per turn for a batch of examples."""
    per_example = [
        template.encode_pairs(prompt + response[:1], system, tool, discard_history_thought)
        for prompt, response, system, tool in zip(prompts, responses, systems, tools)
    ]
    flat = [side for pairs in per_example for pair in pairs for side in pair]
    ids = iter(ElementTokenizer(tokenizer)(flat))
    return [[(next(ids), next(ids)) for _ in pairs] for pairs in per_example]


def build_supervised(
    pairs: list[tuple], template: Template, eos_id: int, cutoff_len: int, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]]:
    """Concatenate turns within cutoff_len, masking prompts (and history turns when mask_history)."""
    input_ids, labels = [], []
    total = 1 if template.efficient_eos else 0
    if mask_history:
        pairs = pairs[::-1]
    for turn, (source, target) in enumerate(pairs):
        if total >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        if train_on_prompt:
            source_label = source
        elif template.efficient_eos and turn != 0:
            source_label = [eos_id] + [IGNORE_INDEX] * (source_len - 1)
        else:
            source_label = [IGNORE_INDEX] * source_len
        target_label = [IGNORE_INDEX] * target_len if mask_history and turn != 0 else target
        if mask_history:
            input_ids, labels = source + target + input_ids, source_label + target_label + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_label + target_label
    if template.efficient_eos:
        input_ids, labels = input_ids + [eos_id], labels + [eos_id]
    return input_ids, labels


def preprocess_supervised(
    batch: dict, template: Template, tokenizer, cutoff_len: int, train_on_prompt: bool, mask_history: bool
) -> dict:
    discard = mask_history and not template.preserve_thinking
    turns = encode_turns(
        template, tokenizer, batch["_prompt"], batch["_response"], batch["_system"], batch["_tools"], discard
    )
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for pairs in turns:
        ids, labels = build_supervised(
            pairs, template, tokenizer.eos_token_id, cutoff_len, train_on_prompt, mask_history
        )
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def preprocess_pretrain(
    batch: dict, tokenizer, cutoff_len: int, packing: bool, template_name: str | None = None
) -> dict:
    """Texts + eos; with packing they are joined and cut into cutoff_len blocks (LLaMA-Factory's pt rule)."""
    eos = "<|end_of_text|>" if template_name == "llama3" else tokenizer.eos_token
    texts = [messages[0]["content"] + eos for messages in batch["_prompt"]]
    if not packing:
        if getattr(tokenizer, "add_bos_token", False):
            texts = [tokenizer.bos_token + t for t in texts]
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=cutoff_len)["input_ids"]
    else:
        joined = list(chain.from_iterable(tokenizer(texts, add_special_tokens=False)["input_ids"]))
        usable = (len(joined) // cutoff_len) * cutoff_len
        ids = [joined[i : i + cutoff_len] for i in range(0, usable, cutoff_len)]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
            for block in ids:
                block[0] = tokenizer.bos_token_id
    return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": [list(x) for x in ids]}


def is_valid_text(example: dict) -> bool:
    """A pretraining record: a non-empty text."""
    return bool(example["_prompt"]) and bool(example["_prompt"][0]["content"])


def is_valid_supervised(example: dict) -> bool:
    """A supervised record: user/assistant turns in order, ending with a non-empty answer."""
    prompt, response = example["_prompt"], example["_response"]
    return len(prompt) % 2 == 1 and len(response) == 1 and bool(response[0]["content"])


def encode_supervised_records(batch: dict, attr, template: Template, tokenizer, data_args) -> dict:
    """Raw records → aligned → tokenized, in one pass and one row per record (so splits match LLaMA-Factory's).

    Records that are malformed, or left with nothing to learn after truncation, come out empty with
    `_valid` False; the pipeline drops them after splitting and reports how many.
    """
    d = data_args
    n = len(next(iter(batch.values())))
    aligned = [convert({k: v[i] for k, v in batch.items()}, attr) for i in range(n)]
    keep = [i for i, a in enumerate(aligned) if is_valid_supervised(a)]
    columns = {k: [aligned[i][k] for i in keep] for k in ("_prompt", "_response", "_system", "_tools")}
    encoded = preprocess_supervised(columns, template, tokenizer, d.cutoff_len, d.train_on_prompt, d.mask_history)
    input_ids, labels, valid = [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
    for j, i in enumerate(keep):
        input_ids[i], labels[i] = encoded["input_ids"][j], encoded["labels"][j]
        valid[i] = any(x != IGNORE_INDEX for x in labels[i])
    return as_arrow_table(input_ids, labels, valid)


def as_arrow_table(input_ids: list[list[int]], labels: list[list[int]], valid: list[bool]):
    """Columns built from flat buffers: several times cheaper than datasets' per-row conversion of lists."""
    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    total = int(lengths.sum())

    def column(rows, dtype):
        flat = np.fromiter(chain.from_iterable(rows), dtype=dtype, count=total)
        return pa.ListArray.from_arrays(offsets, pa.array(flat))

    return pa.table(
        {
            "input_ids": column(input_ids, np.int32),
            "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(total, dtype=np.int8))),
            "labels": column(labels, np.int64),
            "_valid": pa.array(valid),
        }
    )


def encode_prompt(template: Template, tokenizer, messages: list[dict], system: str | None = None, tools=None) -> list:
    """The ids a model generates its next answer after: `messages` (user, assistant, ..., user) rendered and
    tokenized exactly as training renders the prompt of that turn (LLaMA-Factory's encode_oneturn with an
    empty answer), never truncated."""
    pairs = encode_turns(template, tokenizer, [messages], [[{"role": "assistant", "content": ""}]], [system], [tools])
    ids = [i for source, target in pairs[0][:-1] for i in source + target]
    return ids + pairs[0][-1][0]
