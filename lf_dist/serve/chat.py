"""`lf-dist chat`: a terminal chat with streamed answers and the conversation as history.

Typed `clear` forgets the history, `exit` ends the chat (so does Ctrl-D); LLaMA-Factory's CLI words. When the
conversation no longer fits the model's context (with room for max_new_tokens), its oldest turns are dropped,
with one notice line; a message that cannot fit even alone is refused in one line, and the chat goes on.
"""

from __future__ import annotations

import sys

from lf_dist.config import RunConfig

WELCOME = "Welcome to lf-dist chat: type `clear` to forget the history, `exit` to leave."


def fit(engine, history: list[dict], query: str):
    """(the generation, the number of earlier exchanges dropped) for `query` after as much of `history` as fits;
    ContextTooLong if the query alone does not."""
    from lf_dist.serve.engine import ContextTooLong

    message = [{"role": "user", "content": query}]
    for dropped in range(0, len(history) // 2 + 1):
        try:
            return engine.prepare(history[2 * dropped :] + message), dropped
        except ContextTooLong:
            if 2 * dropped >= len(history):
                raise
    raise AssertionError("unreachable")


def run_chat(cfg: RunConfig, stdin=None, stdout=None) -> int:
    from lf_dist.serve.engine import ChatEngine, ContextTooLong

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
        try:
            generation, dropped = fit(engine, history, query)
        except ContextTooLong as err:
            print(f"This message is too long to answer: {err}; the conversation is kept.", file=stdout, flush=True)
            continue
        if dropped:
            history = history[2 * dropped :]
            print(
                f"(The oldest {dropped} exchange(s) were dropped to fit the model's context of "
                f"{engine.context_length} tokens.)",
                file=stdout,
                flush=True,
            )
        print("Assistant: ", end="", file=stdout, flush=True)
        reply = ""
        generation.start()
        try:
            for piece in generation:
                print(piece, end="", file=stdout, flush=True)
                reply += piece
        finally:
            generation.cancel()
        print(file=stdout, flush=True)
        history += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
