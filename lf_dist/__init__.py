"""lf-dist: run LLaMA-Factory fine-tuning configs at any scale with one training loop."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries to fetch an optional kernel from the Hugging Face hub on import and warns when
# it cannot (always, offline); its built-in kernel is used instead, so the warning is only noise for users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
