"""Chat templates: turn aligned messages into per-message *elements*, token-identical to LLaMA-Factory.

Elements are strings (each tokenized on its own, without special tokens added), BOS / EOS (the tokenizer's
ids) and Token(name) (one named token). Keeping LLaMA-Factory's element boundaries reproduces its token ids
exactly; `tokenize.py` then sends every string of a whole batch through the fast tokenizer in one call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from lf_dist.data.tool_formats import format_calls, format_tools, parse_calls

BOS, EOS = "<<bos>>", "<<eos>>"
CONTENT = "{{content}}"


@dataclass(frozen=True)
class Token:
    """A single named token (e.g. `<|user|>` of chatglm), looked up in the vocabulary."""

    name: str


@dataclass(frozen=True)
class Template:
    name: str
    user: tuple = (CONTENT,)
    assistant: tuple | None = None  # None: (CONTENT, EOS), or (CONTENT,) with efficient_eos
    system: tuple | None = None  # None: the bare content
    observation: tuple | None = None  # None: like user
    function: tuple | None = None  # None: like assistant
    tool_format: str = "default"
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    thought_words: tuple = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple = ("<tool_call>", "</tool_call>")
    efficient_eos: bool = False
    replace_eos: bool = False
    replace_jinja_template: bool = False
    kind: str = "base"  # base | llama2 (system fused into the first user turn) | reasoning (think blocks)
    enable_thinking: bool | None = True
    preserve_thinking: bool = False

    # -- slots ---------------------------------------------------------------------------------------
    @property
    def assistant_slots(self) -> tuple:
        return self.assistant or ((CONTENT,) if self.efficient_eos else (CONTENT, EOS))

    def slots(self, role: str) -> tuple:
        return {
            "user": self.user,
            "assistant": self.assistant_slots,
            "system": self.system or (CONTENT,),
            "observation": self.observation or self.user,
            "function": self.function or self.assistant_slots,
        }[role]

    def with_options(self, **changes) -> Template:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @staticmethod
    def fill(slots: tuple, content: str) -> list:
        return [s.replace(CONTENT, content, 1) if isinstance(s, str) and s not in (BOS, EOS) else s for s in slots]

    # -- rendering -----------------------------------------------------------------------------------
    def _function_text(self, content: str) -> str:
        """A function turn: JSON call(s), optionally after a thought or inside tool-call words."""
        opened, closed = self.tool_call_words
        match = re.search(f"{re.escape(opened)}(.*?){re.escape(closed)}", content, re.DOTALL)
        if match is not None:
            return content.replace(match.group(0), "") + format_calls(self.tool_format, parse_calls(match.group(1)))
        thought = re.search(
            f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}", content, re.DOTALL
        )
        json_part = content.replace(thought.group(0), "") if thought else content
        text = format_calls(self.tool_format, parse_calls(json_part))
        return thought.group(0) + text if thought else text

    def render(self, messages: list[dict], system: str | None = None, tools: str | None = None) -> list[list]:
        """Elements of each message, in order (user, assistant, user, assistant, ...)."""
        system = system or self.default_system
        rendered = []
        for i, message in enumerate(messages):
            elements, system_text = [], ""
            if i == 0:
                elements += list(self.prefix)
                if system or tools:
                    tool_text = format_tools(self.tool_format, tools) if tools else ""
                    sys_elements = self.fill(self.slots("system"), system + tool_text)
                    if self.kind == "llama2":
                        system_text = sys_elements[0]
                    else:
                        elements += sys_elements
            role, content = message["role"], message["content"]
            if role == "user":
                content = system_text + content
            elif role == "function":
                content = self._function_text(content)
            elements += self.fill(self.slots(role), content)
            rendered.append(elements)
        return rendered

    def encode_pairs(
        self,
        messages: list[dict],
        system: str | None = None,
        tools: str | None = None,
        discard_history_thought: bool = False,
    ) -> list[tuple[list, list]]:
        """(prompt elements, response elements) per turn; reasoning templates add the empty think block."""
        if self.kind != "reasoning":
            rendered = self.render(messages, system, tools)
            return [(rendered[i], rendered[i + 1]) for i in range(0, len(rendered), 2)]
        messages = [dict(m) for m in messages]
        if self.enable_thinking is False:
            for i in range(1, len(messages), 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        if discard_history_thought:
            for i in range(1, len(messages) - 2, 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        rendered = self.render(messages, system, tools)
        empty = self.thought_words[0] + self.thought_words[1]
        opened, closed = (w.strip() for w in self.thought_words)
        turns = [len(messages) - 2] if discard_history_thought else range(0, len(messages), 2)
        for i in turns:
            answer = messages[i + 1]["content"]
            if opened not in answer and closed not in answer:
                if not self.enable_thinking:
                    rendered[i] = rendered[i] + [empty]  # shown in the prompt, not learned
                else:
                    rendered[i + 1] = [empty] + rendered[i + 1]  # learned as part of the answer
        return [(rendered[i], rendered[i + 1]) for i in range(0, len(rendered), 2)]

    def remove_thought(self, content: str) -> str:
        pattern = re.compile(f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}", re.DOTALL)
        return re.sub(pattern, "", content).lstrip("\n")
