"""alignloop: the whole RLHF loop, HF-native — SFT, human preferences, reward model, PPO, evaluation."""

import os

# Nothing in alignloop downloads: models load from local directories only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers.utils import logging as _hf_logging  # noqa: E402

# Keep the console for our own progress bars and summaries.
_hf_logging.set_verbosity_error()
_hf_logging.disable_progress_bar()

__version__ = "0.1.0"
