"""The training loop and evaluation (:mod:`.loop`), and causal-LM fine-tuning (:mod:`.causal_lm`)."""

from .loop import *  # noqa: F401,F403
from .loop import __all__  # noqa: F401
