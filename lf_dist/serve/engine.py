"""One model answering chats: prompts rendered by the training template, generation with a KV cache, tokens
streamed as they come, stop strings, token counts. `chat` and `api` both talk to a `ChatEngine`; do_predict
(`lf_dist/train/predict.py`) turns the same generation keys into `generate` arguments and ids into text with the
functions here (`generation_kwargs`, `hidden_ids`, `answer_text`), so its answers read as chat's.

Each answer is a `Generation` run by a thread of its own, which holds the engine's lock (one generation at a time
on the one model) only while it generates. Whoever reads the text never holds the lock, so a reader that goes
away (a client that closed its stream) blocks nobody: `cancel()` stops the generation at its next token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lf_dist.config import RunConfig
from lf_dist.data.templates import stop_token_ids
from lf_dist.data.tokenize import encode_prompt
from lf_dist.errors import UserError
from lf_dist.serve.export import DTYPES, load_tokenizer_and_template
from lf_dist.serve.weights import load_weights


@dataclass
class Answer:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop (end of turn or a stop string) | length (max_new_tokens reached)


@dataclass
class Sampling:
    """Per-request generation settings; defaults come from the config's generation keys."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    repetition_penalty: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # set under the lock, right before this generation: reproducible sampling
    num_beams: int = 1  # beam search: do_predict only (a stream is one sequence; chat and api refuse it)
    length_penalty: float = 1.0

    @classmethod
    def of(cls, generating_args) -> Sampling:
        """The config's generation keys."""
        g = generating_args
        return cls(
            g.do_sample,
            g.temperature,
            g.top_p,
            g.top_k,
            g.max_new_tokens,
            g.repetition_penalty,
            num_beams=g.num_beams,
            length_penalty=g.length_penalty,
        )


def generation_kwargs(s: Sampling, eos_ids: list[int], tokenizer) -> dict:
    """transformers' `generate` arguments for `s`, the prompt and streamer aside (chat, api and do_predict)."""
    sample = s.do_sample and s.temperature > 0  # temperature 0 means greedy, as LLaMA-Factory reads it
    kwargs = {
        "max_new_tokens": s.max_new_tokens,
        "do_sample": sample,
        "repetition_penalty": s.repetition_penalty,
        "eos_token_id": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sample:
        kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    else:  # greedy: no sampling knobs (transformers warns about unused ones)
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if s.num_beams != 1:
        kwargs.update(num_beams=s.num_beams, length_penalty=s.length_penalty)
    if s.stop:
        kwargs.update(stop_strings=s.stop, tokenizer=tokenizer)
    return kwargs


def hidden_ids(tokenizer, template, eos_ids: list[int], skip_special_tokens: bool) -> set[int]:
    """The ids an answer's text never shows: the end-of-turn ids, and with skip_special_tokens the special
    tokens except the template's tool-call words (some tokenizers mark them special, and the API reads calls by
    them)."""
    if not skip_special_tokens:
        return set(eos_ids)
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    keep = {tokenizer.convert_tokens_to_ids(w) for w in template.tool_call_words}
    return set(eos_ids) | ((special | set(tokenizer.all_special_ids)) - keep)


class ContextTooLong(UserError):
    """The prompt and max_new_tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int):
        super().__init__(
            f"the prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens}) exceed the model's context "
            f"of {context} tokens"
        )
        self.prompt_tokens = prompt_tokens


class _Streamer:
    """Receives generated ids from `generate` (a streamer), hands out decoded text pieces. The end-of-turn ids
    and hidden special tokens never reach the text."""

    def __init__(self, tokenizer, hidden: set[int]):
        from transformers import TextIteratorStreamer

        self.inner = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.hidden = hidden
        self.ids: list[int] = []
        self.ended = False
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            self.inner.put(value)
            return
        new = value.reshape(-1).tolist()
        self.ids += new
        shown = [i for i in new if i not in self.hidden]
        if shown:
            self.inner.put(torch.tensor(shown))

    def end(self):
        if not self.ended:
            self.ended = True
            self.inner.end()


def answer_text(tokenizer, hidden: set[int], ids: list[int]) -> str:
    """The text a chat shows for generated `ids` (up to and including the one that ended the answer): replayed
    through the chat's streamer one token at a time, as `generate` hands them over, so a batch's answers read
    exactly as streamed ones (the streamer's decoding splits at line ends)."""
    streamer = _Streamer(tokenizer, hidden)
    streamer.put(torch.tensor([tokenizer.pad_token_id]))  # the prompt, which the streamer skips
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    return "".join(streamer.inner)


class Generation:
    """One answer: `start()` runs it on its own thread; iterating yields its text pieces (text from a stop string on
    is held back and dropped); `cancel()` stops it at the next token, from any thread."""

    def __init__(self, engine: ChatEngine, ids: list[int], sampling: Sampling):
        self.engine, self.sampling, self.prompt_tokens = engine, sampling, len(ids)
        self.streamer = _Streamer(engine.tokenizer, engine.hidden_ids)
        self._cancel = threading.Event()
        self.kwargs = engine._generate_kwargs(ids, sampling, self.streamer)
        self.kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(self._cancel)])
        self.error: Exception | None = None
        self.stopped = False  # ended by a stop string
        self.cancelled = False  # stopped by cancel() before it ended by itself
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pieces = self._read()

    def start(self) -> Generation:
        self._thread.start()
        return self

    def cancel(self) -> None:
        if not self._cancel.is_set() and not self.streamer.ended:
            self.cancelled = True
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def completion_tokens(self) -> int:
        return len(self.streamer.ids)

    @property
    def finish_reason(self) -> str:
        ids, s = self.streamer.ids, self.sampling
        ended = bool(ids) and ids[-1] in self.engine.eos_ids
        return "length" if len(ids) >= s.max_new_tokens and not ended and not self.stopped else "stop"

    def _run(self) -> None:
        try:
            with self.engine.lock:
                if not self._cancel.is_set():  # a request cancelled while it waited never generates
                    if self.sampling.seed is not None:
                        torch.manual_seed(self.sampling.seed)
                    with torch.inference_mode():
                        self.engine.model.generate(**self.kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised in the reader's thread
            self.error = err
        finally:
            self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def next_piece(self) -> str | None:
        """The next text piece, None at the end (for readers on another thread)."""
        return next(self._pieces, None)

    def _read(self) -> Iterator[str]:
        stops, held = self.sampling.stop, ""
        for piece in self.streamer.inner:
            if self.stopped:
                continue
            held += piece
            cut = _first_stop(held, stops)
            if cut is not None:
                held, self.stopped = held[:cut], True
            safe = len(held) if self.stopped else len(held) - _partial_stop(held, stops)
            if safe:
                yield held[:safe]
                held = held[safe:]
        self.wait()
        if self.error is not None:
            raise self.error
        if held and not self.stopped:
            yield held


class ChatEngine:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.tokenizer, self.template = load_tokenizer_and_template(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, head = load_weights(cfg, self.tokenizer, self._dtype(), self.device, merge=None)
        if head.name != "causal_lm":
            raise UserError("model_name_or_path: a reward model scores answers and cannot chat")
        self.model.config.use_cache = True
        self.model.generation_config.use_cache = True
        self.context_length = getattr(self.model.config, "max_position_embeddings", None) or 1 << 20
        self.eos_ids = stop_token_ids(self.template, self.tokenizer)
        self.hidden_ids = hidden_ids(self.tokenizer, self.template, self.eos_ids, cfg.generation.skip_special_tokens)
        self.lock = threading.Lock()  # one generation at a time on the one model

    def _dtype(self) -> torch.dtype:
        name = self.cfg.generation.infer_dtype
        if name != "auto":
            return DTYPES[name]
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # half precision on a CPU is slow where it works at all

    @property
    def name(self) -> str:
        return self.cfg.model.model_name_or_path

    def default_sampling(self) -> Sampling:
        return Sampling.of(self.cfg.generation)

    def encode(self, messages: list[dict], system: str | None = None, tools: str | None = None) -> list[int]:
        return encode_prompt(self.template, self.tokenizer, messages, system, tools)

    def _generate_kwargs(self, ids: list[int], s: Sampling, streamer) -> dict:
        return {
            "input_ids": torch.tensor([ids], device=self.device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            "streamer": streamer,
            **generation_kwargs(s, self.eos_ids, self.tokenizer),
        }

    def prepare(
        self,
        messages: list[dict],
        sampling: Sampling | None = None,
        system: str | None = None,
        tools: str | None = None,
    ) -> Generation:
        """The answer to `messages`, rendered and checked (ContextTooLong) but not started."""
        s = sampling or self.default_sampling()
        ids = self.encode(messages, system or self.cfg.data.default_system, tools)
        if len(ids) + s.max_new_tokens > self.context_length:
            raise ContextTooLong(len(ids), s.max_new_tokens, self.context_length)
        return Generation(self, ids, s)

    def stream(
        self,
        messages: list[dict],
        sampling: Sampling | None = None,
        system: str | None = None,
        answer: Answer | None = None,
        tools: str | None = None,
    ) -> Iterator[str]:
        """Text pieces of the answer as they are generated; `answer` (an Answer) gets the counts and finish
        reason when the stream ends."""
        generation = self.prepare(messages, sampling, system, tools)
        answer = answer if answer is not None else Answer()
        answer.prompt_tokens = generation.prompt_tokens
        generation.start()
        try:
            yield from generation
        finally:  # a reader that stops early stops the generation
            generation.cancel()
            generation.wait()
        answer.completion_tokens, answer.finish_reason = generation.completion_tokens, generation.finish_reason

    def chat(
        self,
        messages: list[dict],
        sampling: Sampling | None = None,
        system: str | None = None,
        tools: str | None = None,
    ) -> Answer:
        answer = Answer()
        answer.text = "".join(self.stream(messages, sampling, system, answer, tools))
        return answer


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that may be the start of a stop string (held back until known)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
