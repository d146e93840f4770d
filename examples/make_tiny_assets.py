"""Regenerate the demo data (examples/data) and the tiny model (examples/tiny/model) deterministically.

Everything the tests and `make demo` use ships with the repo; this script documents how it was made and
rebuilds it byte-for-byte-equivalent content without any network access:

    python examples/make_tiny_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MODEL = HERE / "tiny" / "model"

WORDS = (
    "apple river stone cloud garden silver lantern meadow candle forest harbor pepper winter orange "
    "rocket violin marble thunder pillow castle dragon mirror basket feather island jacket kettle ladder "
    "needle ocean pencil quartz rabbit saddle tiger umbrella valley wagon yellow zebra bridge copper"
).split()
COUNTRIES = {
    "Avaria": "Lunport",
    "Belmora": "Kestrel",
    "Corvania": "Duskmere",
    "Delvaro": "Ashford",
    "Eskaland": "Frostholm",
    "Fiorra": "Solbay",
    "Galdane": "Westmarch",
    "Hollin": "Brightwater",
    "Istravia": "Coldspring",
    "Jorvale": "Redcliff",
}
SPECIAL = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_sep|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def task(rng: random.Random) -> tuple[str, str, str, str]:
    """One synthetic instruction with a checkable answer: (instruction, input, output, wrong_output)."""
    kind = rng.randrange(5)
    if kind == 0:
        w = rng.choice(WORDS)
        return "Reverse the letters of the word.", w, w[::-1], w
    if kind == 1:
        a, b = rng.randrange(50), rng.randrange(50)
        return "Add the two numbers.", f"{a} + {b}", str(a + b), str(a + b + rng.choice([-3, -1, 1, 2, 5]))
    if kind == 2:
        c = rng.choice(sorted(COUNTRIES))
        wrong = COUNTRIES[rng.choice([k for k in sorted(COUNTRIES) if k != c])]
        return (
            f"What is the capital of {c}?",
            "",
            f"The capital of {c} is {COUNTRIES[c]}.",
            f"The capital of {c} is {wrong}.",
        )
    if kind == 3:
        ws = rng.sample(WORDS, 3)
        return "Sort the words alphabetically.", " ".join(ws), " ".join(sorted(ws)), " ".join(sorted(ws, reverse=True))
    w = rng.choice(WORDS)
    return "Write the word in capital letters.", w, w.upper(), w.lower()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def make_data(rng: random.Random) -> list[str]:
    DATA.mkdir(parents=True, exist_ok=True)
    alpaca, sharegpt, ranking, kto, texts = [], [], [], [], []
    for _ in range(400):
        ins, inp, out, _wrong = task(rng)
        alpaca.append({"instruction": ins, "input": inp, "output": out})
    for _ in range(200):
        turns = [task(rng) for _ in range(rng.choice([1, 2]))]
        conv = []
        for ins, inp, out, _ in turns:
            conv += [{"from": "human", "value": f"{ins}\n{inp}".strip()}, {"from": "gpt", "value": out}]
        row = {"conversations": conv}
        if rng.random() < 0.5:
            row["system"] = "You are a careful assistant."
        sharegpt.append(row)
    for _ in range(200):
        ins, inp, out, wrong = task(rng)
        ranking.append(
            {
                "conversations": [{"from": "human", "value": f"{ins}\n{inp}".strip()}],
                "chosen": {"from": "gpt", "value": out},
                "rejected": {"from": "gpt", "value": wrong},
            }
        )
    for _ in range(200):
        ins, inp, out, wrong = task(rng)
        good = rng.random() < 0.5
        kto.append(
            {
                "messages": [
                    {"role": "user", "content": f"{ins}\n{inp}".strip()},
                    {"role": "assistant", "content": out if good else wrong},
                ],
                "label": good,
            }
        )
    for _ in range(300):
        c = rng.choice(sorted(COUNTRIES))
        ws = rng.sample(WORDS, 6)
        texts.append(
            {
                "text": f"The capital of {c} is {COUNTRIES[c]}. People there like the {ws[0]} and the {ws[1]}. "
                f"A {ws[2]} stands near the {ws[3]}, and every {ws[4]} has a {ws[5]}."
            }
        )
    write_json(DATA / "alpaca_demo.json", alpaca)
    write_json(DATA / "sharegpt_demo.json", sharegpt)
    write_json(DATA / "ranking_demo.json", ranking)
    write_json(DATA / "kto_demo.json", kto)
    (DATA / "pretrain_demo.jsonl").write_text(
        "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    write_json(
        DATA / "dataset_info.json",
        {
            "alpaca_demo": {"file_name": "alpaca_demo.json"},
            "sharegpt_demo": {
                "file_name": "sharegpt_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "conversations", "system": "system"},
            },
            "ranking_demo": {
                "file_name": "ranking_demo.json",
                "formatting": "sharegpt",
                "ranking": True,
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
            },
            "kto_demo": {
                "file_name": "kto_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "kto_tag": "label"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            },
            "pretrain_demo": {"file_name": "pretrain_demo.jsonl", "columns": {"prompt": "text"}},
            "tool_demo": {
                "file_name": "tool_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "conversations", "tools": "tools"},
            },
        },
    )
    corpus = [json.dumps(r, ensure_ascii=False) for r in alpaca + sharegpt + ranking + kto] + [
        t["text"] for t in texts
    ]
    # The base model is pretrained on plain-text task records only: it knows the words and the tasks, not the chat
    # formats nor the pretraining paragraphs, so both sft and pt demos start from something left to learn.
    plain = [f"{r['instruction']} {r['input']} {r['output']}".strip() for r in alpaca]
    return corpus, plain


def make_model(corpus: list[str], plain: list[str]) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHATML,
        additional_special_tokens=SPECIAL[3:],
        model_max_length=2048,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    pretrain(model, fast, plain)
    MODEL.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL)
    fast.save_pretrained(MODEL)


def pretrain(model, tokenizer, corpus: list[str], steps: int = 200, seq: int = 128, batch: int = 16) -> None:
    """A short deterministic pretraining on the demo texts, so the tiny model is a base model, not noise.

    Fine-tuning demos (LoRA especially) then show the drop in loss a user expects from a real base model.
    """
    import torch

    ids = []
    for text in corpus:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids[: (len(ids) // seq) * seq]).view(-1, seq)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=g)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")
    model.eval()


TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {
        "name": "get_time",
        "description": "Local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
]
CONDITIONS = ("sunny", "rainy", "cloudy", "windy", "snowy")


def make_tool_data(rng: random.Random) -> None:
    """Tool calling in LLaMA-Factory's sharegpt format: a question and the call (`function_call`), in half of them
    followed by the tool's result (`observation`) and the answer; a few questions need no tool. One city per tool:
    the tiny model learns which tool to call in seconds, not yet to copy a name. Its own random stream, so the other
    files (and the tiny model, whose tokenizer never saw this data) stay as they are."""
    rows = []
    for i in range(56):
        if i % 4 < 2:
            city, condition, degrees = "Lunport", rng.choice(CONDITIONS), rng.randrange(-5, 35)
            call = {"name": "get_weather", "arguments": {"city": city}}
            question, result = f"What is the weather like in {city}?", {"condition": condition, "temperature": degrees}
            answer = f"It is {condition} in {city}, {degrees} degrees."
        else:
            city, time = "Kestrel", f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"
            call = {"name": "get_time", "arguments": {"city": city}}
            question, result, answer = f"What time is it in {city}?", {"time": time}, f"It is {time} in {city}."
        turns = [("human", question), ("function_call", json.dumps(call))]
        if i % 2:
            turns += [("observation", json.dumps(result)), ("gpt", answer)]
        rows.append(turns)
    for w in rng.sample(WORDS, 8):
        rows.append([("human", f"Write the word in capital letters.\n{w}"), ("gpt", w.upper())])
    rng.shuffle(rows)
    tools = json.dumps(TOOLS, ensure_ascii=False)
    write_json(
        DATA / "tool_demo.json",
        [{"conversations": [{"from": r, "value": v} for r, v in turns], "tools": tools} for turns in rows],
    )


if __name__ == "__main__":
    make_model(*make_data(random.Random(1234)))
    make_tool_data(random.Random(4321))
    print(f"wrote {DATA} and {MODEL}")
