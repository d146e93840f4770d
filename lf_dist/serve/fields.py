"""Which fields of a chat-completions request the server honours; nothing is silently ignored.

Honoured: model (any name: the answer carries the name asked for, as LLaMA-Factory's API does), messages
(system / developer, user, assistant with or without tool_calls, tool), temperature, top_p, max_tokens /
max_completion_tokens, stop, n = 1, stream, stream_options.include_usage, tools with tool_choice auto or none
(none: the tools are neither shown to the model nor read from its answer), parallel_tool_calls (false: the first
call only), and seed (the sampler is seeded under the model's lock, right before that generation). Extensions:
do_sample (LLaMA-Factory), top_k and repetition_penalty (as vLLM takes them, `extra_body` in the openai client).

Accepted as bookkeeping with no effect on the answer: user, metadata, store (nothing is stored).

Refused with a 400 naming the field unless it has its no-op value (what many clients send by default):
presence_penalty / frequency_penalty (0: OpenAI's additive penalties have no equivalent here; LLaMA-Factory's API
passes presence_penalty on as a repetition_penalty, a different scale, so lf-dist asks for repetition_penalty
instead), logprobs (false), top_logprobs (0), logit_bias ({}), response_format (type text), and anything else
(functions and function_call, OpenAI's older tool fields, included) unless it is null.
"""

from __future__ import annotations

from lf_dist.serve.protocol import ChatRequest, RequestError

BOOKKEEPING = frozenset({"user", "metadata", "store"})

# field: (values that change nothing, why it is refused otherwise)
NO_OP = {
    "presence_penalty": ((0,), "OpenAI's additive penalty is not implemented; send repetition_penalty (e.g. 1.1)"),
    "frequency_penalty": ((0,), "OpenAI's additive penalty is not implemented; send repetition_penalty (e.g. 1.1)"),
    "logprobs": ((False,), "log-probabilities are not returned"),
    "top_logprobs": ((0,), "log-probabilities are not returned"),
    "logit_bias": (({},), "logit_bias is not implemented"),
    "response_format": (({"type": "text"},), "only text answers: JSON modes and schemas are not enforced"),
    "functions": (([],), "the older function-calling fields are not read: send `tools`"),
    "function_call": (("none", "auto"), "the older function-calling fields are not read: send `tools`"),
}


def check_fields(req: ChatRequest) -> None:
    """A 400 naming the first field the server would otherwise ignore."""
    for name, value in (req.model_extra or {}).items():
        if value is None or name in BOOKKEEPING:
            continue
        no_ops, why = NO_OP.get(name, ((), "this server does not support it"))
        if value not in no_ops:
            raise RequestError(400, f"{name}: {why}", param=name, code="unsupported_parameter")
    if req.n != 1:
        raise RequestError(400, "n: only 1 is supported", param="n", code="unsupported_parameter")
    if req.stop is not None and len(req.stop_list()) > 4:
        raise RequestError(400, "stop: at most 4 sequences", param="stop")
    if req.tool_choice not in (None, "auto", "none"):
        raise RequestError(
            400,
            "tool_choice: only auto and none (the model decides whether to call a tool; it cannot be forced)",
            param="tool_choice",
            code="unsupported_parameter",
        )
