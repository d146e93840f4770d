"""A Jinja chat template equivalent to a lf-dist template, saved with the tokenizer of a trained or exported model
so that other tools (transformers' `apply_chat_template`, vLLM, TGI) render the prompts it was trained on.

Built as LLaMA-Factory builds its own (`_get_jinja_template`): the prefix, an optional system block, then each
message through its role's slots; the user slot already ends with the assistant header.
"""

from __future__ import annotations

from lf_dist.data.template_elements import BOS, CONTENT, EOS, Template, Token


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _expr(slots, tokenizer, placeholder: str = "content") -> str:
    """Slots as one Jinja expression: quoted strings, the placeholder variable, special tokens."""
    parts = []
    for slot in slots:
        if slot == BOS:
            parts.append(_quote(tokenizer.bos_token or ""))
        elif slot == EOS:
            parts.append(_quote(tokenizer.eos_token or ""))
        elif isinstance(slot, Token):
            parts.append(_quote(slot.name))
        elif CONTENT in slot:
            left, right = slot.split(CONTENT, 1)
            parts += [_quote(left)] if left else []
            parts.append(placeholder)
            parts += [_quote(right)] if right else []
        elif slot:
            parts.append(_quote(slot))
    return " + ".join(parts) or "''"


def jinja_template(template: Template, tokenizer) -> str:
    """System (first message or the template's default), then user / assistant turns."""
    out = ""
    if template.prefix:
        out += "{{ " + _expr(template.prefix, tokenizer) + " }}"
    if template.default_system:
        out += "{% set system_message = " + _quote(template.default_system) + " %}"
    out += (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    )
    system = _expr(template.slots("system"), tokenizer, placeholder="system_message")
    if template.kind != "llama2":
        out += "{% if system_message is defined and system_message %}{{ " + system + " }}{% endif %}"
    out += "{% for message in loop_messages %}{% set content = message['content'] %}"
    if template.kind == "llama2":
        out += (
            "{% if loop.index0 == 0 and system_message is defined and system_message %}"
            "{% set content = " + system + " + message['content'] %}{% endif %}"
        )
    out += "{% if message['role'] == 'user' %}{{ " + _expr(template.slots("user"), tokenizer) + " }}"
    out += "{% elif message['role'] == 'assistant' %}{{ " + _expr(template.slots("assistant"), tokenizer) + " }}"
    out += "{% endif %}{% endfor %}"
    return out
