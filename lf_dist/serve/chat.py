"""`lf-dist chat`: a terminal chat with streamed answers and the conversation as history.

Typed `clear` forgets the history, `exit` ends the chat (so does Ctrl-D); LLaMA-Factory's CLI words.
"""

from __future__ import annotations

import sys

from lf_dist.config import RunConfig

WELCOME = "Welcome to lf-dist chat: type `clear` to forget the history, `exit` to leave."


def run_chat(cfg: RunConfig, stdin=None, stdout=None) -> int:
    from lf_dist.serve.engine import ChatEngine

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    engine = ChatEngine(cfg)
    print(WELCOME, file=stdout, flush=True)
    history: list[dict] = []
    while True:
        print("\nUser: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=stdout, flush=True)
            return 0
        query = line.strip()
        if query == "exit":
            return 0
        if query == "clear":
            history = []
            print("History has been removed.", file=stdout, flush=True)
            continue
        if not query:
            continue
        messages = history + [{"role": "user", "content": query}]
        print("Assistant: ", end="", file=stdout, flush=True)
        reply = ""
        for piece in engine.stream(messages):
            print(piece, end="", file=stdout, flush=True)
            reply += piece
        print(file=stdout, flush=True)
        history = messages + [{"role": "assistant", "content": reply}]
