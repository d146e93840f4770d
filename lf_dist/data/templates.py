"""Named chat templates (LLaMA-Factory's names, slots and rules), the tokenizer-derived template, and set-up."""

from __future__ import annotations

from lf_dist.data.template_elements import BOS, CONTENT, EOS, Template
from lf_dist.errors import UserError
from lf_dist.log import get_logger

logger = get_logger(__name__)

_IM_USER = ("<|im_start|>user\n" + CONTENT + "<|im_end|>\n<|im_start|>assistant\n",)
_IM_ASSISTANT = (CONTENT + "<|im_end|>\n",)
_IM_SYSTEM = ("<|im_start|>system\n" + CONTENT + "<|im_end|>\n",)
_QWEN_OBS = (
    "<|im_start|>user\n<tool_response>\n" + CONTENT + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)
_QWEN = dict(
    user=_IM_USER,
    assistant=_IM_ASSISTANT,
    system=_IM_SYSTEM,
    observation=_QWEN_OBS,
    function=(CONTENT + "<|im_end|>\n",),
    tool_format="qwen",
    stop_words=("<|im_end|>",),
    replace_eos=True,
)
_GEMMA = dict(
    user=("<start_of_turn>user\n" + CONTENT + "<end_of_turn>\n<start_of_turn>model\n",),
    assistant=(CONTENT + "<end_of_turn>\n",),
    system=(CONTENT + "\n\n",),
    observation=("<start_of_turn>tool\n" + CONTENT + "<end_of_turn>\n<start_of_turn>model\n",),
    prefix=(BOS,),
    stop_words=("<end_of_turn>",),
    replace_eos=True,
    kind="llama2",
)
_L3 = "<|start_header_id|>{}<|end_header_id|>\n\n"

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            "default",
            user=("Human: " + CONTENT, EOS, "\nAssistant:"),
            assistant=(CONTENT, EOS, "\n"),
            system=("System: " + CONTENT, EOS, "\n"),
            replace_jinja_template=True,
        ),
        Template("empty", assistant=(CONTENT,)),
        Template(
            "chatml",
            user=_IM_USER,
            assistant=_IM_ASSISTANT,
            system=_IM_SYSTEM,
            observation=("<|im_start|>tool\n" + CONTENT + "<|im_end|>\n<|im_start|>assistant\n",),
            stop_words=("<|im_end|>", "<|im_start|>"),
            replace_eos=True,
            replace_jinja_template=True,
        ),
        Template(
            "qwen", **_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        ),
        Template("qwen3", **_QWEN, kind="reasoning"),
        Template("qwen3_nothink", **_QWEN),
        Template("yi", user=_IM_USER, assistant=_IM_ASSISTANT, system=_IM_SYSTEM, stop_words=("<|im_end|>",)),
        Template(
            "llama3",
            user=(_L3.format("user") + CONTENT + "<|eot_id|>" + _L3.format("assistant"),),
            assistant=(CONTENT + "<|eot_id|>",),
            system=(_L3.format("system") + CONTENT + "<|eot_id|>",),
            function=(CONTENT + "<|eot_id|>",),
            observation=(_L3.format("ipython") + CONTENT + "<|eot_id|>" + _L3.format("assistant"),),
            tool_format="llama3",
            prefix=(BOS,),
            stop_words=("<|eot_id|>", "<|eom_id|>"),
            replace_eos=True,
        ),
        Template(
            "llama2",
            user=(BOS, "[INST] " + CONTENT + " [/INST]"),
            system=("<<SYS>>\n" + CONTENT + "\n<</SYS>>\n\n",),
            kind="llama2",
        ),
        Template(
            "mistral",
            user=("[INST] " + CONTENT + "[/INST]",),
            assistant=(" " + CONTENT, EOS),
            system=(CONTENT + "\n\n",),
            function=("[TOOL_CALLS] " + CONTENT, EOS),
            observation=('[TOOL_RESULTS] {"content": ' + CONTENT + "}[/TOOL_RESULTS]",),
            tool_format="mistral",
            prefix=(BOS,),
            kind="llama2",
        ),
        Template("gemma", **_GEMMA),
        Template("gemma3", **_GEMMA),
        Template(
            "phi4",
            user=("<|im_start|>user<|im_sep|>" + CONTENT + "<|im_end|><|im_start|>assistant<|im_sep|>",),
            assistant=(CONTENT + "<|im_end|>",),
            system=("<|im_start|>system<|im_sep|>" + CONTENT + "<|im_end|>",),
            stop_words=("<|im_end|>",),
            replace_eos=True,
        ),
        Template("deepseek3", user=("<｜User｜>" + CONTENT + "<｜Assistant｜>",), prefix=(BOS,)),
        Template(
            "glm4",
            user=("<|user|>\n" + CONTENT + "<|assistant|>",),
            assistant=("\n" + CONTENT,),
            system=("<|system|>\n" + CONTENT,),
            function=(CONTENT,),
            observation=("<|observation|>\n" + CONTENT + "<|assistant|>",),
            tool_format="glm4",
            prefix=("[gMASK]<sop>",),
            stop_words=("<|user|>", "<|observation|>"),
            efficient_eos=True,
        ),
    ]
}


def parse_template(tokenizer) -> Template:
    """A template read off the tokenizer's jinja chat_template by rendering placeholder messages (as LLaMA-Factory)."""

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def find_diff(short: str, long: str) -> str:
        i, diff = 0, ""
        for ch in long:
            if i < len(short) and short[i] == ch:
                i += 1
            else:
                diff += ch
        return diff

    prefix = tokenizer.decode(tokenizer.encode(""))
    system_slot = render([{"role": "system", "content": CONTENT}], False)[len(prefix) :]
    user_empty_system = render([{"role": "system", "content": ""}, {"role": "user", "content": CONTENT}], True)
    user_empty_system = user_empty_system[len(prefix) :]
    user_slot = render([{"role": "user", "content": CONTENT}], True)[len(prefix) :]
    both = render([{"role": "user", "content": CONTENT}, {"role": "assistant", "content": CONTENT}], False)
    assistant_slot = both[len(prefix) + len(user_slot) :]
    kind = "reasoning" if "<think>" in assistant_slot else "base"
    assistant_slot = assistant_slot.replace("<think>", "").replace("</think>", "").lstrip("\n")
    default_system = ""
    if len(user_slot) > len(user_empty_system):
        default_system = find_diff(user_empty_system, user_slot)
        user_slot = user_slot[len(system_slot.replace(CONTENT, default_system, 1)) :]
    return Template(
        "tokenizer",
        user=(user_slot,),
        assistant=(assistant_slot,),
        system=(system_slot,),
        observation=(user_slot,),
        function=(assistant_slot,),
        prefix=(prefix,) if prefix else (),
        default_system=default_system,
        kind=kind,
    )


def get_template(name: str | None, tokenizer, data_args=None) -> Template:
    """A named template; when unset, the tokenizer's chat_template (else 'empty'). Options from the data config."""
    if name is None:
        if isinstance(getattr(tokenizer, "chat_template", None), str):
            template = parse_template(tokenizer)
        else:
            template = TEMPLATES["empty"]
    elif name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (available: {', '.join(sorted(TEMPLATES))})"
        raise UserError(f"template: unknown template '{name}'{hint}")
    else:
        template = TEMPLATES[name]
    if data_args is None:
        return template
    if data_args.train_on_prompt and template.efficient_eos:
        raise UserError(f"train_on_prompt: template '{template.name}' does not support it (efficient_eos)")
    changes = {"default_system": data_args.default_system}
    if data_args.tool_format is not None:
        changes.update(
            tool_format=data_args.tool_format, function=(CONTENT,) if template.efficient_eos else (CONTENT, EOS)
        )
    if template.kind == "reasoning":
        changes.update(enable_thinking=data_args.enable_thinking, preserve_thinking=data_args.preserve_thinking)
    return template.with_options(**changes)


def stop_token_ids(template: Template, tokenizer) -> list[int]:
    """The ids that end an answer: eos and the template's stop words (after `fix_tokenizer`)."""
    ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(w) for w in template.stop_words]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def fix_tokenizer(template: Template, tokenizer) -> list[str]:
    """Stop words, eos/pad and the Jinja chat template as LLaMA-Factory sets them; returns tokens added to the
    vocabulary."""
    vocab_before = len(tokenizer)
    stop_words = list(template.stop_words)
    if template.replace_eos:
        if tokenizer.eos_token != stop_words[0]:
            tokenizer.add_special_tokens({"eos_token": stop_words[0]})
        stop_words = stop_words[1:]
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if stop_words:
        try:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": stop_words}, replace_additional_special_tokens=False
            )
        except TypeError:
            tokenizer.add_special_tokens({"additional_special_tokens": stop_words})
    if template.replace_jinja_template or not isinstance(getattr(tokenizer, "chat_template", None), str):
        # saved with the model, so other tools render the prompts it is trained on (as LLaMA-Factory does)
        from lf_dist.data.jinja import jinja_template

        tokenizer.chat_template = jinja_template(template, tokenizer)
    added = tokenizer.convert_ids_to_tokens(list(range(vocab_before, len(tokenizer))))
    if added:
        logger.info(f"template '{template.name}' added token(s) {', '.join(added)} to the vocabulary")
    return added
