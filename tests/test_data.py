"""Data: registry, formats, templates, label masking and truncation, as LLaMA-Factory defines them."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lf_dist.data import build_datasets
from lf_dist.data.registry import DatasetAttr, get_dataset_attrs
from lf_dist.data.templates import TEMPLATES, fix_tokenizer, get_template
from lf_dist.data.tokenize import IGNORE_INDEX, build_supervised, infer_seqlen
from lf_dist.errors import UserError

from .conftest import DATA_DIR, TINY_MODEL, stage_data

REQUIRED_TEMPLATES = [
    "default",
    "empty",
    "chatml",
    "qwen",
    "qwen3",
    "qwen3_nothink",
    "llama3",
    "llama2",
    "mistral",
    "gemma",
    "gemma3",
    "phi4",
    "deepseek3",
    "yi",
    "glm4",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def _build(make_cfg, tokenizer, **kw):
    cfg = make_cfg(**kw)
    template = get_template(cfg.data.template, tokenizer, cfg.data)
    fix_tokenizer(template, tokenizer)
    return build_datasets(cfg, tokenizer, template, stage_data(cfg)), cfg


def _split(tokenizer, row):
    prompt = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE_INDEX])
    answer = tokenizer.decode([lab for lab in row["labels"] if lab != IGNORE_INDEX])
    return prompt, answer


def test_alpaca_prompt_is_masked_and_response_learned(make_cfg, tokenizer):
    bundle, _ = _build(make_cfg, tokenizer)
    raw = json.loads((DATA_DIR / "alpaca_demo.json").read_text(encoding="utf-8"))[0]
    prompt, answer = _split(tokenizer, bundle.train[0])
    assert prompt == f"<|im_start|>user\n{raw['instruction']}\n{raw['input']}<|im_end|>\n<|im_start|>assistant\n"
    assert answer == raw["output"] + "<|im_end|>\n"


def test_sharegpt_multiturn_learns_every_answer_and_uses_system(make_cfg, tokenizer):
    bundle, _ = _build(make_cfg, tokenizer, dataset="sharegpt_demo", cutoff_len=512)
    raw = json.loads((DATA_DIR / "sharegpt_demo.json").read_text(encoding="utf-8"))
    i = next(i for i, r in enumerate(raw) if len(r["conversations"]) == 4 and r.get("system"))
    prompt, answer = _split(tokenizer, bundle.train[i])
    answers = [m["value"] for m in raw[i]["conversations"][1::2]]
    assert answer == "".join(a + "<|im_end|>\n" for a in answers)
    assert prompt.startswith(f"<|im_start|>system\n{raw[i]['system']}<|im_end|>\n")


def test_train_on_prompt_and_mask_history(make_cfg, tokenizer):
    bundle, _ = _build(make_cfg, tokenizer, train_on_prompt=True)
    row = bundle.train[0]
    assert row["labels"] == row["input_ids"]
    plain, _ = _build(make_cfg, tokenizer, dataset="sharegpt_demo", cutoff_len=512, name="plain")
    masked, _ = _build(make_cfg, tokenizer, dataset="sharegpt_demo", cutoff_len=512, mask_history=True, name="mh")
    raw = json.loads((DATA_DIR / "sharegpt_demo.json").read_text(encoding="utf-8"))
    i = next(i for i, r in enumerate(raw) if len(r["conversations"]) == 4)
    assert masked.train[i]["input_ids"] == plain.train[i]["input_ids"]
    _, answer = _split(tokenizer, masked.train[i])
    assert answer == raw[i]["conversations"][3]["value"] + "<|im_end|>\n"  # only the last turn is learned


def test_infer_seqlen_follows_llamafactory_rule():
    assert infer_seqlen(100, 10, 50) == (40, 10)  # short answer: the prompt is cut
    assert infer_seqlen(10, 100, 50) == (10, 40)  # short prompt: the answer is cut
    assert infer_seqlen(60, 40, 50) == (30, 20)  # both long: proportional


def test_truncation_respects_cutoff_len(make_cfg, tokenizer):
    bundle, _ = _build(make_cfg, tokenizer, dataset="sharegpt_demo", cutoff_len=24)
    assert max(len(r) for r in bundle.train["input_ids"]) <= 24
    template = TEMPLATES["empty"]
    ids, labels = build_supervised([([1] * 30, [2] * 30)], template, 0, 20, False, False)
    assert len(ids) == 20 and labels.count(IGNORE_INDEX) == 10


@pytest.mark.parametrize("name", REQUIRED_TEMPLATES)
def test_every_template_renders_masks_and_ends_answer_with_stop(name, tokenizer):
    template = get_template(name, tokenizer)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    fix_tokenizer(template, tok)
    from lf_dist.data.tokenize import preprocess_supervised

    batch = {
        "_prompt": [[{"role": "user", "content": "Add 2 and 3."}]],
        "_response": [[{"role": "assistant", "content": "5"}]],
        "_system": ["Be brief."],
        "_tools": [""],
    }
    out = preprocess_supervised(batch, template, tok, 256, False, False)
    ids, labels = out["input_ids"][0], out["labels"][0]
    text = tok.decode(ids)
    assert "Add 2 and 3." in text and "Be brief." in text
    answer = tok.decode([x for x in labels if x != IGNORE_INDEX])
    assert answer.lstrip().startswith("5") or answer.startswith("<think>\n\n</think>\n\n5")
    assert labels[-1] != IGNORE_INDEX and "Add" not in answer


def test_tokenizer_chat_template_is_used_when_template_unset(make_cfg, tokenizer):
    bundle, _ = _build(make_cfg, tokenizer, dataset="sharegpt_demo", template="null", cutoff_len=512)
    raw = json.loads((DATA_DIR / "sharegpt_demo.json").read_text(encoding="utf-8"))[0]
    messages = ([{"role": "system", "content": raw["system"]}] if raw.get("system") else []) + [
        {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in raw["conversations"]
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(bundle.train[0]["input_ids"]) == expected


def test_pretraining_text_is_joined_with_eos_and_cut_into_blocks(make_cfg, tokenizer):
    bundle, _ = _build(make_cfg, tokenizer, stage="pt", dataset="pretrain_demo", cutoff_len=64, finetuning_type="full")
    lengths = set(len(r) for r in bundle.train["input_ids"])
    assert lengths == {64}
    text = tokenizer.decode(bundle.train[0]["input_ids"])
    assert text.count(tokenizer.eos_token) >= 1
    assert bundle.train[0]["labels"] == bundle.train[0]["input_ids"]


def test_several_datasets_max_samples_and_val_size(make_cfg, tokenizer):
    bundle, _ = _build(make_cfg, tokenizer, dataset="alpaca_demo,sharegpt_demo", max_samples=50, val_size=0.2)
    assert len(bundle.train) + len(bundle.eval) == 100 and len(bundle.eval) == 20


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_file_formats_load_the_same_records(tmp_path, make_cfg, tokenizer, fmt):
    import datasets

    rows = json.loads((DATA_DIR / "alpaca_demo.json").read_text(encoding="utf-8"))[:20]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"demo.{fmt}"
    {"jsonl": lambda: ds.to_json(path), "csv": lambda: ds.to_csv(path), "parquet": lambda: ds.to_parquet(path)}[fmt]()
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": path.name}}), encoding="utf-8")
    bundle, _ = _build(make_cfg, tokenizer, dataset="d", dataset_dir=str(tmp_path))
    ref, _ = _build(make_cfg, tokenizer, max_samples=20, name="ref")
    assert bundle.train["input_ids"] == ref.train["input_ids"]


def test_column_and_tag_mappings_with_history(tmp_path, make_cfg, tokenizer):
    rows = [{"q": "second?", "a": "two", "h": [["first?", "one"]], "s": "sys"}]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    conv = [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}]
    (tmp_path / "c.json").write_text(json.dumps([{"chat": conv}]), encoding="utf-8")
    info = {
        "d": {"file_name": "d.json", "columns": {"prompt": "q", "response": "a", "history": "h", "system": "s"}},
        "c": {
            "file_name": "c.json",
            "formatting": "sharegpt",
            "columns": {"messages": "chat"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
        },
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    bundle, _ = _build(make_cfg, tokenizer, dataset="d", dataset_dir=str(tmp_path))
    _, answer = _split(tokenizer, bundle.train[0])
    assert answer == "one<|im_end|>\ntwo<|im_end|>\n"
    assert "<|im_start|>system\nsys<|im_end|>" in tokenizer.decode(bundle.train[0]["input_ids"])
    bundle, _ = _build(make_cfg, tokenizer, dataset="c", dataset_dir=str(tmp_path), name="c")
    assert _split(tokenizer, bundle.train[0])[1] == "hello<|im_end|>\n"


def test_malformed_records_are_dropped_with_one_count(tmp_path, make_cfg, tokenizer, caplog):
    conv_ok = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    conv_bad = [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]
    rows = [{"conversations": conv_ok}, {"conversations": conv_bad}, {"conversations": conv_ok[:1]}]
    (tmp_path / "s.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"s": {"file_name": "s.json", "formatting": "sharegpt"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    import logging

    logging.getLogger("lf_dist").propagate = True
    with caplog.at_level(logging.WARNING, logger="lf_dist"):
        bundle, _ = _build(make_cfg, tokenizer, dataset="s", dataset_dir=str(tmp_path))
    logging.getLogger("lf_dist").propagate = False
    assert len(bundle.train) == 1
    assert "dropped 2 examples that are malformed" in caplog.text and "2 of 3 train" in caplog.text


def test_hub_urls_take_llamafactorys_precedence(tmp_path, monkeypatch):
    entries = {
        "hf": {"hf_hub_url": "org/data", "file_name": "local.json"},  # a hub URL wins over file_name, as there
        "both": {"hf_hub_url": "org/data", "ms_hub_url": "ms-org/data", "subset": "s", "folder": "f"},
        "ms": {"ms_hub_url": "ms-org/data"},
        "script": {"script_url": "my_script"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    hf, both, ms = get_dataset_attrs("hf,both,ms", tmp_path)
    assert (hf.load_from, hf.file_name) == ("hf_hub", "org/data")
    assert (both.load_from, both.file_name, both.subset, both.folder) == ("hf_hub", "org/data", "s", "f")
    assert (ms.load_from, ms.file_name) == ("ms_hub", "ms-org/data")
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert get_dataset_attrs("both", tmp_path)[0].file_name == "ms-org/data"
    with pytest.raises(UserError, match="does not run dataset scripts"):
        get_dataset_attrs("script", tmp_path)


def test_registry_defaults_for_sharegpt():
    attr = get_dataset_attrs("sharegpt_demo", DATA_DIR)[0]
    assert isinstance(attr, DatasetAttr) and attr.tags["role_tag"] == "from" and attr.columns["system"] == "system"


def test_parallel_preprocessing_gives_the_same_rows(tmp_path, make_cfg, tokenizer):
    rows = json.loads((DATA_DIR / "alpaca_demo.json").read_text(encoding="utf-8")) * 3
    (tmp_path / "big.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.json"}}), encoding="utf-8")
    serial, _ = _build(make_cfg, tokenizer, dataset="big", dataset_dir=str(tmp_path), name="s")
    parallel, _ = _build(
        make_cfg,
        tokenizer,
        dataset="big",
        dataset_dir=str(tmp_path),
        name="p",
        preprocessing_num_workers=2,
        overwrite_cache=True,
    )
    assert len(serial.train) == 1200
    assert serial.train["input_ids"] == parallel.train["input_ids"]
    assert serial.train["labels"] == parallel.train["labels"]


def test_tokenized_path_is_written_once_then_loaded_without_preprocessing(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "tokenized"
    first, _ = _build(make_cfg, tokenizer, tokenized_path=str(path), val_size=0.1, max_samples=50)
    assert (path / "dataset_dict.json").is_file() and not (tmp_path / "tokenized.tmp").exists()
    import datasets

    saved = datasets.load_from_disk(str(path))
    assert set(saved) == {"train", "validation"}
    assert set(saved["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    # A later run loads it: the dataset named in the config is not even read.
    again, _ = _build(make_cfg, tokenizer, tokenized_path=str(path), dataset="does_not_exist", name="again")
    assert again.train["input_ids"] == first.train["input_ids"] and again.eval["labels"] == first.eval["labels"]


def test_packed_tokenized_data_keeps_position_ids(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "packed"
    _build(make_cfg, tokenizer, tokenized_path=str(path), packing=True, neat_packing=True, cutoff_len=256)
    import datasets

    cols = set(datasets.load_from_disk(str(path))["train"].column_names)
    assert cols == {"input_ids", "attention_mask", "labels", "position_ids"}


def test_folder_txt_arrow_split_and_resampling(tmp_path, make_cfg, tokenizer):
    import datasets

    rows = json.loads((DATA_DIR / "alpaca_demo.json").read_text(encoding="utf-8"))[:30]
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[i * 10 : i * 10 + 10]), encoding="utf-8"
        )
    (tmp_path / "plain.txt").write_text("first line of text\nsecond line of text\n", encoding="utf-8")
    arrow_dir = tmp_path / "arrow"
    datasets.Dataset.from_list(rows).save_to_disk(str(arrow_dir))
    info = {
        "folder": {"file_name": "shards"},
        "sliced": {"file_name": "shards", "split": "train[:5]"},
        "more": {"file_name": "shards", "num_samples": 45},
        "fewer": {"file_name": "shards", "num_samples": 7},
        "text": {"file_name": "plain.txt", "columns": {"prompt": "text"}},
        "arrow": {"file_name": next(str(p.relative_to(tmp_path)) for p in arrow_dir.glob("*.arrow"))},
        "hub_downloaded": {"hf_hub_url": "shards"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")

    def build(name, **kw):
        return _build(make_cfg, tokenizer, dataset=name, dataset_dir=str(tmp_path), name=name, **kw)[0]

    assert build("folder").train["input_ids"] == build("arrow").train["input_ids"]
    assert len(build("folder").train) == 30 and len(build("sliced").train) == 5
    assert len(build("more").train) == 45 and len(build("fewer").train) == 7  # with replacement when larger
    assert len(build("hub_downloaded").train) == 30
    text = build("text", stage="pt", finetuning_type="full", packing=False).train
    assert tokenizer.decode(text[0]["input_ids"]).startswith("first line of text")


def test_kto_and_ranking_records_with_bad_tags_are_dropped_by_the_converter():
    from lf_dist.data.converters import convert
    from lf_dist.data.registry import DatasetAttr

    kto = get_dataset_attrs("kto_demo", DATA_DIR)[0]
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}
    assert [m["content"] for m in convert(good, kto)["_response"]] == ["a", ""]
    assert convert({**good, "label": "yes"}, kto)["_response"] == []
    rank = get_dataset_attrs("ranking_demo", DATA_DIR)[0]
    pair = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    assert [m["content"] for m in convert(pair, rank)["_response"]] == ["good", "bad"]
    assert convert({**pair, "rejected": {"from": "human", "value": "bad"}}, rank)["_response"] == []
    assert isinstance(rank, DatasetAttr)
