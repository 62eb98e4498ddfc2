"""Shared fixtures: a tiny tokenizer + GPT-2 saved as a HF directory, built in seconds.

Tests of every stage load models from directories exactly as users do; these
models are random (untrained) unless a test trains them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignloop.corpus import load_corpus
from alignloop.modeling import build_causal_lm, load_tokenizer, save_model_dir
from alignloop.reward.model import RewardModel, init_reward_model
from alignloop.tokenizer import train_tokenizer

# The longest files, longest first: `make test` hands each pytest-xdist worker whole files in
# collection order, and a long file that starts last runs on alone while the other worker idles.
LONGEST_FILES_FIRST = ("test_distributed.py", "test_resume.py", "test_inputs.py", "test_algorithms.py",
                       "test_annotate_crash.py", "test_realdata_gguf.py", "test_compare.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order stays


@pytest.fixture(scope="session")
def fortunes() -> list[str]:
    """A few thousand real quotations from the default corpus (Debian's fortunes)."""
    return load_corpus(max_chars=300)[:3000]


@pytest.fixture(scope="session")
def tiny_tokenizer(fortunes):
    return train_tokenizer(fortunes, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer x 64-wide GPT-2 with our tokenizer, as a HF directory."""
    out = tmp_path_factory.mktemp("tiny_lm")
    model = build_causal_lm(tiny_tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=0)
    save_model_dir(model, tiny_tokenizer, out)
    return out


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_lm_dir):
    """A random reward model on the tiny trunk (the RL tests' reward, critic init and gold RM)."""
    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    RewardModel(init_reward_model(tiny_lm_dir), load_tokenizer(tiny_lm_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory, fortunes):
    """40 four-word prompts from the corpus, as a prompts JSONL."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(d.split()[:4])}) + "\n" for d in fortunes[:40]))
    return path
