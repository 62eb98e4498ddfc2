"""Reward training with a frozen lower trunk (`train_layers`): the cached split scores and trains
exactly as the whole model would, only the top layers move, and architectures it cannot split are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from alignloop.errors import ConfigError
from alignloop.mixed_precision import MasterWeights
from alignloop.modeling import load_tokenizer, save_model_dir
from alignloop.reward.frozen_trunk import FrozenTrunk
from alignloop.reward.model import init_reward_model
from alignloop.reward.train import (
    EncodedItem, ItemScorer, RewardTrainConfig, accumulate_gradients, collate, item_scores, train_reward_model,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 3-layer Llama (rotary positions, grouped-query attention) with our tokenizer."""
    tok = tiny_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llama")
    save_model_dir(LlamaForCausalLM(config), tok, out)
    return out


def items() -> list[EncodedItem]:
    """Two prompts; a pair, a ranking of 3 with a tie, and a sequence that two items share."""
    return [EncodedItem([[5, 6, 7, 8, 9, 2], [5, 6, 7, 11, 12, 2]], [0, 1], None, prompt_len=3),
            EncodedItem([[19, 20, 21, 13, 2], [19, 20, 21, 15, 16, 17, 2], [19, 20, 21, 7, 2]], [1, 0, 1], 0.5,
                        prompt_len=3),
            EncodedItem([[5, 6, 7, 8, 9, 2], [5, 6, 7, 30, 31, 32, 33, 2]], [1, 0], None, prompt_len=3)]


@pytest.mark.parametrize("train_layers", [1, 2])
def test_top_layers_from_cached_states_score_and_train_as_the_whole_model(tiny_llama_dir, train_layers):
    tok = load_tokenizer(tiny_llama_dir)
    model = init_reward_model(tiny_llama_dir, tok)
    trunk, slotted = FrozenTrunk.build(model, items(), train_layers, tok.pad_token_id, "fp32", batch_size=2)
    # 6 distinct sequences (7, one repeated), each prompt's 3 tokens kept once
    assert trunk.sequences == 6 and trunk.states.shape[0] == 1 + 2 * 3 + sum(
        len(s) - 3 for s in {tuple(s) for it in items() for s in it.seqs})
    assert [len(s) for it in slotted for s in it.seqs] == [len(s) for it in items() for s in it.seqs]
    whole_batch = collate(items(), tok.pad_token_id, CPU, pack_width=24)
    split_batch = collate(slotted, 0, CPU, pack_width=24)
    whole = item_scores(model, whole_batch, "fp32")
    split = item_scores(model, split_batch, "fp32", trunk)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)

    # The same gradients for every trained parameter (the lower trunk is frozen in both).
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n, _ in trained)
    grads = []
    for batch, t in ((whole_batch, None), (split_batch, trunk)):
        model.zero_grad(set_to_none=True)
        scorer = ItemScorer(model, "fp32", t)
        accumulate_gradients(scorer, [batch], "fp32", MasterWeights([model], enabled=False))
        grads.append([p.grad.clone() for _, p in trained])
    for (name, _), a, b in zip(trained, *grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def write_pairs(path: Path, n: int) -> Path:
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = [{"prompt": f"Say something {i % 3}.", "chosen": f"a {words[i % 3]} day", "rejected": f"a {words[3 + i % 3]} day {i}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_layers_moves_only_the_top_layers_and_saves_a_whole_model(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 48)
    held = write_pairs(tmp_path / "held.jsonl", 12)
    out = tmp_path / "rm"
    summary = train_reward_model(RewardTrainConfig(model=tiny_llama_dir, data=data, held_out_data=held, out_dir=out,
                                                   train_layers=1, batch_size=8, epochs=2, lr=1e-2,
                                                   normalize_samples=8, precision="fp32", checkpoint_every=0))
    assert summary["frozen_trunk"]["train_layers"] == 1 and summary["frozen_trunk"]["frozen_layers"] == 2
    # 48 pairs: 48 distinct chosen-or-rejected sequences of "a <word> day <i>" plus the 3 chosen ones per prompt
    assert summary["frozen_trunk"]["cached_sequences"] == 48 + 3
    before = init_reward_model(tiny_llama_dir).state_dict()
    after = load_file(out / "model.safetensors")
    moved = {name for name, w in before.items() if name in after and not torch.equal(w, after[name])}
    assert moved and all(n.startswith(("model.layers.2.", "model.norm.", "score.")) for n in moved)
    assert any(n.startswith("model.layers.2.") for n in moved) and "score.weight" in moved
    assert summary["held_out_accuracy"] is not None and summary["train_accuracy"] > 0.5


def test_gpt2_is_refused_in_one_line(tiny_lm_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    with pytest.raises(ConfigError, match=r"train_layers=1: this gpt2 model does not score the same"):
        train_reward_model(RewardTrainConfig(model=tiny_lm_dir, data=data, out_dir=tmp_path / "rm", train_layers=1,
                                             held_out_fraction=0.25, precision="fp32"))


@pytest.mark.parametrize("train_layers, message", [(3, r"train_layers must be in \[1, 2\]"), (-1, "train_layers must be >= 0")])
def test_train_layers_out_of_range_is_refused(tiny_llama_dir, tmp_path, train_layers, message):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    with pytest.raises(ConfigError, match=message):
        train_reward_model(RewardTrainConfig(model=tiny_llama_dir, data=data, out_dir=tmp_path / "rm",
                                             train_layers=train_layers, held_out_fraction=0.25, precision="fp32"))
