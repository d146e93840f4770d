"""One model answering chats: prompts rendered by the training template, generation with a KV cache, tokens
streamed as they come, stop strings, token counts. `chat` and `api` both talk to a `ChatEngine`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lf_dist.config import RunConfig
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


class _Streamer:
    """Receives generated ids from `generate` (a streamer), hands out decoded text pieces."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        from transformers import TextIteratorStreamer

        self.inner = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.ids += value.reshape(-1).tolist()
        self._prompt_seen = True
        self.inner.put(value)

    def end(self):
        self.inner.end()


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
        tok = self.tokenizer
        stop_ids = [tok.eos_token_id] + [tok.convert_tokens_to_ids(w) for w in self.template.stop_words]
        self.eos_ids = list(dict.fromkeys(i for i in stop_ids if i is not None and i != tok.unk_token_id))
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
        g = self.cfg.generation
        return Sampling(g.do_sample, g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.repetition_penalty)

    def encode(self, messages: list[dict], system: str | None = None, tools: str | None = None) -> list[int]:
        return encode_prompt(self.template, self.tokenizer, messages, system, tools)

    def _generate_kwargs(self, ids: list[int], s: Sampling, streamer) -> dict:
        sample = s.do_sample and s.temperature > 0  # temperature 0 means greedy, as LLaMA-Factory reads it
        kwargs = {
            "input_ids": torch.tensor([ids], device=self.device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            "max_new_tokens": s.max_new_tokens,
            "do_sample": sample,
            "repetition_penalty": s.repetition_penalty,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "streamer": streamer,
        }
        if sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:  # greedy: no sampling knobs (transformers warns about unused ones)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if s.stop:
            kwargs.update(stop_strings=s.stop, tokenizer=self.tokenizer)
        return kwargs

    def stream(
        self, messages: list[dict], sampling: Sampling | None = None, system: str | None = None, answer=None
    ) -> Iterator[str]:
        """Text pieces of the answer as they are generated; `answer` (an Answer) gets the counts and finish
        reason when the stream ends. Text from a stop string on is held back and dropped."""
        s = sampling or self.default_sampling()
        answer = answer if answer is not None else Answer()
        ids = self.encode(messages, system or self.cfg.data.default_system)
        answer.prompt_tokens = len(ids)
        if len(ids) + s.max_new_tokens > self.context_length:
            raise UserError(
                f"the prompt ({len(ids)} tokens) and max_new_tokens ({s.max_new_tokens}) exceed the model's "
                f"context of {self.context_length} tokens"
            )
        streamer = _Streamer(self.tokenizer, self.cfg.generation.skip_special_tokens)
        cancel = threading.Event()  # set when the reader goes away (a client that disconnected)
        kwargs = self._generate_kwargs(ids, s, streamer)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        errors: list[Exception] = []

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except Exception as err:  # noqa: BLE001 - re-raised in the reader's thread
                errors.append(err)
                streamer.end()

        held, stopped = "", False
        with self.lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                for piece in streamer.inner:
                    if stopped:
                        continue
                    held += piece
                    cut = _first_stop(held, s.stop)
                    if cut is not None:
                        held, stopped = held[:cut], True
                    safe = len(held) if stopped else len(held) - _partial_stop(held, s.stop)
                    if safe:
                        yield held[:safe]
                        held = held[safe:]
            finally:
                cancel.set()
                worker.join()
        if errors:
            raise errors[0]
        if held and not stopped:
            yield held
        answer.completion_tokens = len(streamer.ids)
        ended = bool(streamer.ids) and streamer.ids[-1] in self.eos_ids
        answer.finish_reason = (
            "length" if len(streamer.ids) >= s.max_new_tokens and not ended and not stopped else "stop"
        )

    def chat(self, messages: list[dict], sampling: Sampling | None = None, system: str | None = None) -> Answer:
        answer = Answer()
        answer.text = "".join(self.stream(messages, sampling, system, answer))
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
