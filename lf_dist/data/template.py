"""Chat templates: turn aligned messages into per-message pieces (text or special token ids), as LLaMA-Factory.

A template renders each message into a list of *elements*: strings (tokenized one by one, without special
tokens added) and the markers BOS / EOS (the tokenizer's ids). Keeping elements separate, instead of one
string, reproduces LLaMA-Factory's token boundaries exactly and lets `tokenize.py` batch all strings of a
whole batch of examples through the fast tokenizer in one call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

BOS, EOS = "<<bos>>", "<<eos>>"
CONTENT = "{{content}}"


@dataclass(frozen=True)
class Template:
    name: str
    user: tuple = (CONTENT,)
    assistant: tuple = (CONTENT, EOS)
    system: tuple | None = None  # None: rendered like a user turn
    observation: tuple | None = None  # None: rendered like a user turn
    function: tuple | None = None  # None: rendered like an assistant turn
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    system_in_user: bool = False  # Llama-2 style: the system text opens the first user turn
    thought_words: tuple | None = None  # reasoning templates: ("<think>\n", "\n</think>\n\n")
    enable_thinking: bool = True
    chat_template: str | None = field(default=None, compare=False)  # only for the tokenizer-derived template

    def with_options(self, enable_thinking: bool) -> Template:
        return replace(self, enable_thinking=enable_thinking)

    @staticmethod
    def _apply(slots: tuple, content: str) -> list:
        return [s.replace(CONTENT, content) if s not in (BOS, EOS) else s for s in slots]

    def _slots(self, role: str) -> tuple:
        if role == "user":
            return self.user
        if role == "assistant":
            return self.assistant
        if role == "observation":
            return self.observation or self.user
        if role == "function":
            return self.function or self.assistant
        raise ValueError(f"unexpected role {role}")

    def render(self, messages: list[dict], system: str = "", tools: str = "") -> list[list]:
        """Elements of each message (user, assistant, user, assistant, ...)."""
        system = system or self.default_system
        sys_text = system + (tools or "")
        rendered = []
        for i, message in enumerate(messages):
            elements = list(self.prefix) if i == 0 else []
            content = message["content"]
            if i == 0 and sys_text:
                sys_elements = self._apply(self.system or self.user, sys_text)
                if self.system_in_user:
                    content = "".join(e for e in sys_elements if e not in (BOS, EOS)) + content
                else:
                    elements += sys_elements
            elements += self._apply(self._slots(message["role"]), content)
            rendered.append([e for e in elements if e != ""])
        return rendered

    def encode_pairs(self, messages: list[dict], system: str = "", tools: str = "") -> list[tuple[list, list]]:
        """(prompt elements, response elements) per turn, with the reasoning template's empty think block."""
        if self.thought_words is not None and not self.enable_thinking:
            messages = [dict(m) for m in messages]
            for i in range(1, len(messages) - 2, 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        rendered = self.render(messages, system, tools)
        if self.thought_words is not None:
            empty = self.thought_words[0].strip() + "\n\n" + self.thought_words[1].strip() + "\n\n"
            opened, closed = (w.strip() for w in self.thought_words)
            for i in range(0, len(messages) - 1, 2):
                answer = messages[i + 1]["content"]
                if opened not in answer and closed not in answer:
                    if self.enable_thinking:
                        rendered[i + 1] = [empty] + rendered[i + 1]
                    else:
                        rendered[i] = rendered[i] + [empty]
        return [(rendered[i], rendered[i + 1]) for i in range(0, len(rendered) - 1, 2)]

    def remove_thought(self, content: str) -> str:
        pattern = re.compile(f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}", re.DOTALL)
        return re.sub(pattern, "", content).lstrip("\n")


class HFChatTemplate(Template):
    """The tokenizer's own jinja chat_template, split into turns by rendering growing prefixes of a chat."""

    def render_pairs_text(self, tokenizer, messages: list[dict], system: str = "") -> list[tuple[str, str]]:
        head = [{"role": "system", "content": system}] if system else []
        pairs, done = [], ""
        for i in range(0, len(messages) - 1, 2):
            convo = head + [_hf_msg(m) for m in messages[: i + 2]]
            prompt = tokenizer.apply_chat_template(convo[:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(convo, tokenize=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError("chat_template is not prefix-consistent")
            pairs.append((prompt[len(done) :], full[len(prompt) :]))
            done = full
        return pairs


def _hf_msg(message: dict) -> dict:
    role = {"observation": "tool", "function": "assistant"}.get(message["role"], message["role"])
    return {"role": role, "content": message["content"]}
