"""The named chat templates (LLaMA-Factory's names and formats) and template selection."""

from __future__ import annotations

from lf_dist.data.template import BOS, CONTENT, EOS, HFChatTemplate, Template
from lf_dist.errors import UserError

_THINK = ("<think>\n", "\n</think>\n\n")
_CHATML_USER = ("<|im_start|>user\n" + CONTENT + "<|im_end|>\n<|im_start|>assistant\n",)
_CHATML = dict(
    user=_CHATML_USER,
    assistant=(CONTENT + "<|im_end|>\n",),
    system=("<|im_start|>system\n" + CONTENT + "<|im_end|>\n",),
    observation=("<|im_start|>tool\n" + CONTENT + "<|im_end|>\n<|im_start|>assistant\n",),
    stop_words=("<|im_end|>",),
    replace_eos=True,
)
_QWEN3_OBS = (
    "<|im_start|>user\n<tool_response>\n" + CONTENT + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            "default",
            user=("Human: " + CONTENT, EOS, "\nAssistant:"),
            assistant=(CONTENT, EOS, "\n"),
            system=("System: " + CONTENT, EOS, "\n"),
        ),
        Template("empty", assistant=(CONTENT,)),
        Template("chatml", **{**_CHATML, "stop_words": ("<|im_end|>", "<|im_start|>")}),
        Template(
            "qwen",
            **{**_CHATML, "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
        ),
        Template("qwen3", **{**_CHATML, "observation": _QWEN3_OBS}, thought_words=_THINK),
        Template("qwen3_nothink", **{**_CHATML, "observation": _QWEN3_OBS}),
        Template(
            "llama3",
            user=(
                "<|start_header_id|>user<|end_header_id|>\n\n" + CONTENT + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            assistant=(CONTENT + "<|eot_id|>",),
            system=("<|start_header_id|>system<|end_header_id|>\n\n" + CONTENT + "<|eot_id|>",),
            observation=(
                "<|start_header_id|>ipython<|end_header_id|>\n\n" + CONTENT + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            prefix=(BOS,),
            stop_words=("<|eot_id|>", "<|eom_id|>"),
            replace_eos=True,
        ),
        Template(
            "llama2",
            user=(BOS, "[INST] " + CONTENT + " [/INST]"),
            system=("<<SYS>>\n" + CONTENT + "\n<</SYS>>\n\n",),
            system_in_user=True,
        ),
        Template(
            "mistral",
            user=("[INST] " + CONTENT + "[/INST]",),
            assistant=(CONTENT, EOS),
            system=(CONTENT + "\n\n",),
            observation=('[TOOL_RESULTS] {"content": ' + CONTENT + "}[/TOOL_RESULTS]",),
            prefix=(BOS,),
            system_in_user=True,
        ),
        Template(
            "gemma",
            user=("<start_of_turn>user\n" + CONTENT + "<end_of_turn>\n<start_of_turn>model\n",),
            assistant=(CONTENT + "<end_of_turn>\n",),
            system=(CONTENT + "\n\n",),
            observation=("<start_of_turn>tool\n" + CONTENT + "<end_of_turn>\n<start_of_turn>model\n",),
            prefix=(BOS,),
            stop_words=("<end_of_turn>",),
            replace_eos=True,
            system_in_user=True,
        ),
        Template(
            "phi4",
            user=("<|im_start|>user<|im_sep|>" + CONTENT + "<|im_end|><|im_start|>assistant<|im_sep|>",),
            assistant=(CONTENT + "<|im_end|>",),
            system=("<|im_start|>system<|im_sep|>" + CONTENT + "<|im_end|>",),
            stop_words=("<|im_end|>",),
            replace_eos=True,
        ),
    ]
}


def get_template(name: str | None, tokenizer, enable_thinking: bool = True) -> Template:
    """A named template, or the tokenizer's own chat_template when no name is given (else 'empty')."""
    if name is None:
        chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, str):
            return HFChatTemplate("hf", chat_template=chat_template)
        return TEMPLATES["empty"]
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (available: {', '.join(sorted(TEMPLATES))})"
        raise UserError(f"template: unknown template '{name}'{hint}")
    return TEMPLATES[name].with_options(enable_thinking)


def fix_tokenizer(template: Template, tokenizer) -> list[str]:
    """Apply the template's stop words to the tokenizer (eos replaced, as LLaMA-Factory); returns added tokens."""
    added = []
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        added.append("<|endoftext|>")
    if template.replace_eos and template.stop_words:
        eos = template.stop_words[0]
        if eos not in tokenizer.get_vocab():
            added.append(eos)
        tokenizer.add_special_tokens({"eos_token": eos})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    extra = [w for w in template.stop_words[1:] if w not in tokenizer.get_vocab()]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
        added += extra
    return added
