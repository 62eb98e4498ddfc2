"""Fuzzing model directories: one to three random breakages of a real one, then what every stage does with it.

`load_tokenizer` and `load_causal_lm` / `load_scalar_model` must either load a usable model or raise one
InputError line that starts with the directory (or a file in it). Breakages: files truncated, deleted,
overwritten with random bytes or with one byte flipped; config.json and tokenizer_config.json fields
set to wrong types, NaN, negative or huge numbers; leftovers of an interrupted write.

Derandomized and bounded like test_fuzz_readers (FUZZ_EXAMPLES, 30 unless ALIGNLOOP_FUZZ_EXAMPLES says).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.errors import InputError
from alignloop.modeling import load_causal_lm, load_scalar_model, load_tokenizer

FUZZ_EXAMPLES = int(os.environ.get("ALIGNLOOP_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "chat_template.jinja"]
CONFIG_KEYS = ["model_type", "n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "architectures",
               "activation_function", "eos_token_id", "pad_token_id", "tie_word_embeddings", "layer_norm_epsilon"]
TOKENIZER_KEYS = ["eos_token", "pad_token", "bos_token", "tokenizer_class", "model_max_length", "backend"]
odd_values = st.sampled_from([None, True, 0, -1, 1, 3, 10 ** 12, 1.5, float("nan"), float("inf"), "", "abc",
                              "<|endoftext|>", "<|pad|>", [], {}, ["GPT2LMHeadModel"], "gpt2", "llama"])

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 1)),
    st.tuples(st.just("overwrite"), st.sampled_from(FILES), st.binary(max_size=64)),
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.integers(0, 10 ** 6), st.integers(1, 255)),
    st.tuples(st.just("config.json"), st.sampled_from(CONFIG_KEYS), odd_values),
    st.tuples(st.just("tokenizer_config.json"), st.sampled_from(TOKENIZER_KEYS), odd_values),
    st.tuples(st.just("leftover"), st.sampled_from(["model.safetensors.tmp", "config.json.incomplete"])),
)


def apply(model_dir: Path, mutation: tuple) -> None:
    kind, target = mutation[0], model_dir / mutation[1]
    if kind in ("truncate", "overwrite", "delete", "flip") and not target.is_file():
        return  # an earlier mutation deleted it
    if kind == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: int(len(data) * mutation[2])])
    elif kind == "overwrite":
        target.write_bytes(mutation[2])
    elif kind == "delete":
        target.unlink()
    elif kind == "flip":
        data = bytearray(target.read_bytes())
        if data:
            data[mutation[2] % len(data)] ^= mutation[3]
            target.write_bytes(bytes(data))
    elif kind == "leftover":
        target.write_bytes(b"half")
    else:  # set a field of a JSON file
        try:
            content = json.loads(target.read_text())
        except (OSError, ValueError):
            return  # an earlier mutation broke the file already
        if isinstance(content, dict):
            content[mutation[1]] = mutation[2]
        target.write_text(json.dumps(content))


def assert_loads_or_one_line_error(model_dir: Path, load) -> None:
    try:
        model = load(model_dir)
    except InputError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(str(model_dir)), message
        return
    # What loaded must be usable: one forward pass over a few real token ids.
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


def load_for_generation(model_dir: Path):
    tokenizer = load_tokenizer(model_dir)
    return load_causal_lm(model_dir, "cpu", tokenizer)


def fuzz_model_dir(source: Path, breakages: list[tuple], load) -> None:
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "model"
        shutil.copytree(source, model_dir)
        for mutation in breakages:
            apply(model_dir, mutation)
        assert_loads_or_one_line_error(model_dir, load)


@FUZZ
@given(breakages=st.lists(mutations, min_size=1, max_size=3))
def test_fuzz_causal_lm_dir(tiny_lm_dir, breakages):
    fuzz_model_dir(tiny_lm_dir, breakages, load_for_generation)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_lm_dir) -> Path:
    from alignloop.reward.model import RewardModel, init_reward_model

    tokenizer = load_tokenizer(tiny_lm_dir)
    return RewardModel(init_reward_model(tiny_lm_dir, tokenizer), tokenizer).save_pretrained(
        tmp_path_factory.mktemp("tiny_rm"))


@FUZZ
@given(breakages=st.lists(mutations, min_size=1, max_size=3))
def test_fuzz_reward_model_dir(tiny_rm_dir, breakages):
    fuzz_model_dir(tiny_rm_dir, breakages, load_scalar_model)
