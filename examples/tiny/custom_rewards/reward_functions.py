"""Reward functions for the tiny examples, in the two forms lf-dist calls.

`custom_reward` is the ppo_custom fork's per-sample form; `even_word_share` is TRL's batched form (grpo). Both
score a completion by the share of its words that come from a fixed half of the vocabulary (words whose
code points sum to an even number), a reward in [0, 1] with a base rate near one half that the tiny model can
learn to raise in a few dozen steps on a CPU.
"""


def _even(word: str) -> bool:
    return sum(map(ord, word)) % 2 == 0


def custom_reward(query: str, response: str) -> float:
    """The fork's signature: the prompt as the model saw it, and the response; one float."""
    words = response.split()
    return sum(map(_even, words)) / len(words) if words else 0.0


def even_word_share(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """TRL's signature: lists of prompts and completions (plus completion_ids and the dataset's columns, such as
    `answer`); one reward per completion."""
    return [custom_reward(p, c) for p, c in zip(prompts, completions)]
