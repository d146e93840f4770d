"""Every LLaMA-Factory option and what lf-dist does with it, as the README's table shows it.

Read off the code, never written by hand: a key that is a field of the typed config is honoured; one in
`LF_NO_EFFECT` changes nothing in training and is named in the start-up notice; any other LLaMA-Factory key stops
the run in one line as not implemented. `python -m lf_dist.config.options` prints the table; a test checks that
the README holds exactly that.
"""

from __future__ import annotations

from lf_dist.config.known_keys import LF_KEYS, LF_NO_EFFECT
from lf_dist.config.schema import key_owner

HONOURED = "honoured"
NO_EFFECT = "accepted, no effect on training (named in the start-up notice)"
REFUSED = "refused in one line: not implemented"


def option_status() -> dict[str, str]:
    """LLaMA-Factory key → what lf-dist does with it."""
    owners = key_owner()
    out = {}
    for key in sorted(LF_KEYS):
        if key in owners:
            out[key] = HONOURED
        elif key in LF_NO_EFFECT:
            out[key] = NO_EFFECT
        else:
            out[key] = REFUSED
    return out


def markdown_table() -> str:
    status = option_status()
    counts = {s: sum(v == s for v in status.values()) for s in (HONOURED, NO_EFFECT, REFUSED)}
    head = (
        f"{len(status)} options of LLaMA-Factory's argument classes: {counts[HONOURED]} honoured, "
        f"{counts[NO_EFFECT]} accepted with no effect on training, {counts[REFUSED]} refused as not implemented."
    )
    rows = [f"| `{key}` | {what} |" for key, what in status.items()]
    return "\n".join([head, "", "| option | lf-dist |", "|---|---|", *rows])


if __name__ == "__main__":
    print(markdown_table())
