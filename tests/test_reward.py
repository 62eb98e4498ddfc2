"""Reward model: losses against hand-computed figures, data validation, batching, training, evaluation."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from alignloop.errors import InputError
from alignloop.mixed_precision import MasterWeights
from alignloop.reward.data import Preference, ranks_from_ranking, read_preferences
from alignloop.reward.evaluate import annotator_agreement, calibration_table
from alignloop.reward.losses import bradley_terry_loss, kway_ranking_loss, pairwise_accuracy
from alignloop.reward.train import (
    EncodedItem, accumulate_gradients, collate, fit_normalization, item_scores, length_buckets, pack_rows, shared_prefix_mask,
    packing_works,
)


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- losses -------------------------------------------------------------------------------

def test_bradley_terry_hand_computed_natural_log():
    loss = bradley_terry_loss(torch.tensor([0.0, 5.0, 1.0]), torch.tensor([10.0, 0.0, 1.0]))
    # -ln σ(-10) = 10 + ln(1 + e^-10) = 10.0000454; -ln σ(5) = ln(1 + e^-5) = 0.0067153; -ln σ(0) = ln 2
    assert loss.tolist() == pytest.approx([10.0000454, 0.0067153, math.log(2)], abs=1e-6)


def test_bradley_terry_margin_shifts_the_difference():
    # r_c - r_r = 3, margin 3: the model has only just met the margin, so the loss is ln 2.
    loss = bradley_terry_loss(torch.tensor([4.0]), torch.tensor([1.0]), margin=torch.tensor([3.0]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_bradley_terry_is_finite_for_huge_differences():
    loss = bradley_terry_loss(torch.tensor([0.0, 200.0]), torch.tensor([200.0, 0.0]))
    assert loss.tolist() == pytest.approx([200.0, 0.0], abs=1e-4)


def test_kway_hand_computed_three_responses():
    # Pairs (0>1, d=1), (0>2, d=2), (1>2, d=1): mean of ln(1+e^-1), ln(1+e^-2), ln(1+e^-1).
    loss = kway_ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0, 1, 2]]))
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.2511505, abs=1e-6)


def test_kway_equals_mean_of_its_pairwise_bradley_terry_terms():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, generator=gen)
    ranks = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 0, 2, 1], [1, 0, 3, 2, 0]])  # rows 2, 3 have ties
    valid = torch.tensor([[True] * 5, [True] * 5, [True, True, True, True, False]])  # row 3: K=4, one padding slot
    got = kway_ranking_loss(scores, ranks, valid)
    for b in range(3):
        pairs = [(i, j) for i in range(5) for j in range(5)
                 if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]]
        bt = bradley_terry_loss(scores[b, [i for i, _ in pairs]], scores[b, [j for _, j in pairs]])
        assert got[b].item() == pytest.approx(bt.sum().item() / len(pairs), abs=1e-6)
    assert len([1 for i in range(5) for j in range(5) if ranks[0, i] < ranks[0, j]]) == math.comb(5, 2)


def test_kway_with_two_responses_is_bradley_terry():
    chosen, rejected = torch.tensor([0.3, -1.0]), torch.tensor([1.2, 2.0])
    kway = kway_ranking_loss(torch.stack([chosen, rejected], 1), torch.tensor([[0, 1], [0, 1]]),
                             margin=torch.tensor([0.5, 0.0]))
    assert kway.tolist() == pytest.approx(bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0])).tolist())


def test_pairwise_accuracy_counts_ties_in_score_as_half():
    correct, total = pairwise_accuracy(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0, 1, 2]]))
    assert (correct.item(), total.item()) == (2.5, 3)


# -- data -----------------------------------------------------------------------------------

def test_ranking_groups_become_ranks():
    assert ranks_from_ranking([[0, 2], 1], 3) == [0, 1, 0]
    assert ranks_from_ranking([2, 0, 1], 3) == [1, 2, 0]
    assert "not a permutation" in ranks_from_ranking([0, 1], 3)
    assert "appears twice" in ranks_from_ranking([0, [1, 0]], 2)


def test_reader_accepts_all_formats_and_counts_rejections(tmp_path):
    conv = lambda role, text: [{"role": role, "content": text}]
    path = write(tmp_path / "prefs.jsonl", [
        {"prompt": "Life is", "chosen": " good", "rejected": " bad", "margin": 2},
        {"prompt": conv("user", "Life is"), "chosen": conv("assistant", " sweet"), "rejected": conv("assistant", " sour")},
        {"chosen": conv("user", "Hi") + conv("assistant", "hello!"), "rejected": conv("user", "Hi") + conv("assistant", "go away")},
        {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [[0, 2], 1], "item_id": "p1", "annotator": "ann",
         "all_bad": False},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "  ", "rejected": "x"},
        {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [0, 1]},
        {"prompt": "Q", "responses": ["a", "b"], "ranking": [[0, 1]]},
    ])
    data = read_preferences(path)
    assert [(p.prompt, p.responses, p.ranks) for p in data.items] == [
        ("Life is", [" good", " bad"], [0, 1]),
        ("Life is", [" sweet", " sour"], [0, 1]),
        ("Hi", ["hello!", "go away"], [0, 1]),
        ("Q", ["a", "b", "c"], [0, 1, 0]),
    ]
    assert data.items[0].margin == 2.0 and data.items[3].annotator == "ann" and data.items[3].item_id == "p1"
    summary = data.summary()
    assert summary["rows"] == 8 and summary["used"] == 4 and summary["rejected"] == 4
    assert summary["rejected_by_reason"] == {"chosen == rejected": 1, "empty response": 1,
                                             "ranking is not a permutation of 0..2 (missing [2])": 1,
                                             "no preference (all responses tied)": 1}
    assert summary["comparisons"] == 3 + 2  # three pairs, and the ranking's two strict comparisons
    assert summary["rejected_examples"][0].endswith("prefs.jsonl:5: chosen == rejected")


@pytest.mark.parametrize("row, field", [
    ('{"prompt": "a", "chosen": "b"', None),  # not valid JSON
    ({"prompt": "a", "chosen": "b"}, "rejected"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "chosen"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}, "margin"),
    ({"prompt": "a", "responses": ["x", "y"], "ranking": "0,1"}, "ranking"),
    ({"prompt": "a", "responses": "xy", "ranking": [0, 1]}, "responses"),
    ({"prompt": "a", "text": "b"}, "chosen"),
])
def test_malformed_rows_raise_naming_file_line_and_field(tmp_path, row, field):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(InputError) as e:
        read_preferences(path)
    assert e.value.line == 2 and e.value.field == field and "bad.jsonl:2" in str(e.value)


def test_reader_takes_a_directory_of_files(tmp_path):
    write(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    write(tmp_path / "b.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]}])
    assert [len(p.responses) for p in read_preferences(tmp_path).items] == [2, 3]


# -- batching -------------------------------------------------------------------------------

def test_collate_scores_each_response_once_and_indexes_it():
    items = [EncodedItem([[1, 2, 3], [1, 2]], [0, 1], None),
             EncodedItem([[5], [6, 7], [8, 9, 9, 9]], [1, 0, 2], 1.5)]
    b = collate(items, pad_id=0, device=torch.device("cpu"))
    assert b.input_ids.shape == (5, 4)  # 2 + 3 sequences, not one per pair (1 + 3 pairs -> 8 sequences)
    assert b.index.tolist() == [[0, 1, 0], [2, 3, 4]] and b.valid.tolist() == [[True, True, False], [True] * 3]
    assert b.input_ids[4].tolist() == [8, 9, 9, 9] and b.attention_mask[3].tolist() == [1, 1, 0, 0]
    assert b.margin.tolist() == [0.0, 1.5]


def test_pack_rows_first_fit_decreasing_with_the_prompt_once_per_item():
    # Units (prompt, responses): sizes 2+1+1 = 4, 0+4 = 4 (no shared prompt), 1+1+1 = 3 in rows of 5.
    units = [([1, 2], [[3], [4]]), ([], [[5, 6, 7, 8]]), ([9], [[10], [11]])]
    ids, pos, ends, unit, branch = pack_rows(units, width=5, pad_id=0)
    # No row reaches column 5, so the rows are cut to 4; the short row's tail is filler.
    assert ids == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]]
    # Each response continues the prompt's positions, as prompt + response alone would.
    assert pos == [[0, 1, 2, 2], [0, 1, 2, 3], [0, 1, 1, 0]]
    assert ends == [(0, 2), (0, 3), (1, 3), (2, 1), (2, 2)]  # per response, in item order
    assert branch == [[0, 0, 1, 2], [1, 1, 1, 1], [0, 1, 2, 0]]
    assert unit[2][3] not in unit[2][:3] + unit[0] + unit[1]  # a filler token is a unit of its own
    ids, _, ends, _, _ = pack_rows([([1], [[2, 3, 4, 5, 6]])], width=4, pad_id=0)
    assert ids == [[1, 2, 3, 4, 5, 6]] and ends == [(0, 5)]  # an item longer than the width gets a row of its own


def test_pack_rows_keeps_the_row_count_but_narrows_the_rows_to_spread_the_leftover():
    # Sizes 4, 4, 3, 3 in rows of 8: first-fit gives [4+4] and [3+3], 2 tokens of padding. The same
    # two rows at width 7 hold [4+3] and [4+3] with none.
    units = [([1], [[2, 3, 4]]), ([5], [[6, 7, 8]]), ([9], [[10, 11]]), ([12], [[13, 14]])]
    ids, _, _, unit, _ = pack_rows(units, width=8, pad_id=0)
    assert len(ids) == 2 and all(len(row) == 7 for row in ids) and 0 not in sum(ids, [])
    assert sorted(sorted(set(row)) for row in unit) == [[0, 2], [1, 3]]


def test_shared_prefix_mask_lets_each_response_see_the_prompt_and_itself_only():
    _, _, _, unit, branch = pack_rows([([1, 2], [[3, 4], [5]]), ([6], [[7]])], width=6, pad_id=0)
    mask = shared_prefix_mask(torch.tensor(unit), torch.tensor(branch))[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0],   # prompt token 0
                       [1, 1, 0, 0, 0],   # prompt token 1
                       [1, 1, 1, 0, 0],   # response 1, token 0
                       [1, 1, 1, 1, 0],   # response 1, token 1
                       [1, 1, 0, 0, 1]]   # response 2: the prompt and itself, not response 1
    assert mask[1] == [[1, 0, 0, 0, 0],   # the second item's prompt
                       [1, 1, 0, 0, 0],   # its response
                       [0, 0, 1, 0, 0],   # filler: itself only
                       [0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 1]]


def test_length_buckets_cover_every_item_once_with_less_padding():
    rng = random.Random(0)
    items = [EncodedItem([[1] * rng.randint(5, 100), [1] * rng.randint(5, 100)], [0, 1], None) for _ in range(512)]
    batches = length_buckets(items, 16, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(512))

    def padding(batches):
        lens = [[len(s) for i in b for s in items[i].seqs] for b in batches]
        return sum(max(l) * len(l) - sum(l) for l in lens)
    order = list(range(512))
    random.Random(1).shuffle(order)
    shuffled = [order[i:i + 16] for i in range(0, 512, 16)]
    # What is left is mostly inside items (a short and a long response to one prompt).
    assert padding(batches) < 0.5 * padding(shuffled)


def test_normalization_gives_mean_zero_std_one():
    raw = [0.5, 1.5, 2.5, 3.5]
    gain, bias = fit_normalization(raw)
    scaled = torch.tensor([gain * r + bias for r in raw])
    assert scaled.mean().item() == pytest.approx(0, abs=1e-9) and scaled.std().item() == pytest.approx(1, abs=1e-9)


# -- evaluation pieces -------------------------------------------------------------------

def test_calibration_table_hand_computed():
    cal = calibration_table([0.9, 0.2, 0.55, 0.45], bins=2)  # confidences 0.9, 0.8 | 0.55, 0.55
    low, high = cal["bins"]
    assert (low["count"], low["confidence"], low["accuracy"]) == (2, pytest.approx(0.55), 0.5)
    assert (high["count"], high["confidence"], high["accuracy"]) == (2, pytest.approx(0.85), 0.5)
    assert cal["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.35)


def test_agreement_compares_the_rm_with_annotators_own_agreement():
    pref = lambda who, first, second: Preference("p", [first, second], [0, 1], item_id="i1", annotator=who)
    items = [pref("ann1", "a", "b"), pref("ann2", "a", "b"), pref("ann3", "b", "a"),
             Preference("q", ["c", "d"], [0, 1], item_id="i2", annotator="ann1")]  # labelled once: not counted
    scores = {("p", "a"): 1.0, ("p", "b"): 0.0, ("q", "c"): 0.0, ("q", "d"): 1.0}
    got = annotator_agreement(items, scores)
    # annotator pairs: (1,2) agree, (1,3) and (2,3) disagree -> 1/3; RM picks "a" like 2 of 3 labels.
    assert got == {"items": 1, "labels": 3, "annotator_agreement": pytest.approx(1 / 3),
                   "rm_agreement": pytest.approx(2 / 3)}


# -- model --------------------------------------------------------------------------------

def test_gradient_accumulation_matches_one_big_batch(tiny_lm_dir):
    from alignloop.modeling import load_tokenizer
    from alignloop.reward.model import init_reward_model

    tok = load_tokenizer(tiny_lm_dir)
    rng = random.Random(0)
    seq = lambda n: [rng.randrange(3, 400) for _ in range(n)]
    items = [EncodedItem([seq(rng.randint(3, 12)) for _ in range(k)], list(range(k)), None) for k in (2, 2, 2, 4, 3)]

    def grads(micro_sizes, pack_width=0):
        torch.manual_seed(0)  # the same fresh head every time
        model = init_reward_model(tiny_lm_dir, tok)
        micro, start = [], 0
        for n in micro_sizes:
            micro.append(collate(items[start:start + n], tok.pad_token_id, torch.device("cpu"), pack_width))
            start += n
        loss, _, _ = accumulate_gradients(model, micro, "fp32", MasterWeights([model], enabled=False))
        return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss_one, g_one = grads([5])
    loss_acc, g_acc = grads([3, 2])  # unequal micro-batches: a per-micro-batch mean would get this wrong
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    assert torch.allclose(g_one, g_acc, atol=1e-6)
    loss_packed, g_packed = grads([5], pack_width=16)  # packing changes where tokens sit, not the math
    assert loss_packed == pytest.approx(loss_one, rel=1e-5)
    assert torch.allclose(g_one, g_packed, atol=1e-5)


def test_packed_sequences_score_exactly_as_padded_ones(tiny_lm_dir):
    from alignloop.modeling import load_tokenizer
    from alignloop.reward.model import init_reward_model

    tok = load_tokenizer(tiny_lm_dir)
    torch.manual_seed(0)
    model = init_reward_model(tiny_lm_dir, tok)
    assert packing_works(model, tok.pad_token_id, torch.device("cpu"))
    rng = random.Random(1)
    def item(k, prompt_len):  # K responses after one shared prompt (prompt_len 0: nothing shared)
        prompt = [rng.randrange(3, 400) for _ in range(prompt_len)]
        return EncodedItem([prompt + [rng.randrange(3, 400) for _ in range(rng.randint(1, 30))] for _ in range(k)],
                           list(range(k)), None, prompt_len)
    items = [item(2, 5), item(3, 0), item(2, 12), item(4, 3)]
    padded = collate(items, tok.pad_token_id, torch.device("cpu"))
    packed = collate(items, tok.pad_token_id, torch.device("cpu"), pack_width=40)
    assert packed.input_ids.numel() < padded.input_ids.numel()
    with torch.no_grad():
        assert torch.allclose(item_scores(model, packed, "fp32"), item_scores(model, padded, "fp32"), atol=1e-5)


def test_items_sharing_a_prompt_pack_it_once_and_score_as_padded(tiny_lm_dir):
    from alignloop.modeling import load_tokenizer
    from alignloop.reward.model import init_reward_model
    from alignloop.reward.train import shared_prompt_units

    tok = load_tokenizer(tiny_lm_dir)
    torch.manual_seed(0)
    model = init_reward_model(tiny_lm_dir, tok)
    p, q = [7, 8, 9, 10], [11, 12]
    items = [EncodedItem([p + [20, 21], p + [22]], [0, 1], None, 4),
             EncodedItem([q + [23, 24, 25], q + [26]], [1, 0], None, 2),
             EncodedItem([p + [27], p + [28, 29], p + [30]], [2, 0, 1], None, 4),
             EncodedItem([p + [31] * 9, p + [32]], [0, 1], None, 4)]  # no room left in p's first unit of width 16
    units, index = shared_prompt_units(items, width=16)
    assert units == [(p, [[20, 21], [22], [27], [28, 29], [30]]), (q, [[23, 24, 25], [26]]), (p, [[31] * 9, [32]])]
    assert index == [[0, 1, 0], [5, 6, 0], [2, 3, 4], [7, 8, 0]]
    padded = collate(items, tok.pad_token_id, torch.device("cpu"))
    packed = collate(items, tok.pad_token_id, torch.device("cpu"), pack_width=16)
    assert packed.real_tokens == 4 + 7 + 2 + 4 + 4 + 10  # each unit's prompt once
    with torch.no_grad():
        torch.testing.assert_close(item_scores(model, packed, "fp32"), item_scores(model, padded, "fp32"),
                                   atol=1e-5, rtol=1e-5)


def test_score_reads_the_last_non_pad_token(tiny_lm_dir):
    from alignloop.modeling import load_tokenizer
    from alignloop.prompts import encode_prompt, encode_response, pad_right
    from alignloop.reward.model import RewardModel, init_reward_model

    tok = load_tokenizer(tiny_lm_dir)
    rm = RewardModel(init_reward_model(tiny_lm_dir, tok), tok)
    seqs = [encode_prompt(tok, "Life is") + encode_response(tok, t) for t in (" short", " a much longer response here")]
    ids, mask = pad_right(seqs, tok.pad_token_id)
    padded = rm.score_ids(torch.tensor(ids), torch.tensor(mask))
    alone = [rm.score_ids(torch.tensor([s]), torch.tensor([[1] * len(s)])).item() for s in seqs]
    assert padded.tolist() == pytest.approx(alone, abs=1e-5)
    assert rm.score(["Life is"] * 2, [" short", " a much longer response here"]) == pytest.approx(alone, abs=1e-5)


def test_data_with_every_prompt_held_out_says_so_and_unusable_rows_say_why(tmp_path, tiny_lm_dir):
    """One distinct prompt cannot be split into training and held-out prompts: the error says that,
    not that the rows were unusable; rows that are unusable say why."""
    from alignloop.reward.train import RewardTrainConfig, load_splits

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                "chosen": [{"role": "assistant", "content": "hello"}],
                                "rejected": [{"role": "assistant", "content": "go"}]}) + "\n")
    config = RewardTrainConfig(model=tiny_lm_dir, data=data)
    with pytest.raises(InputError, match=r"no preferences left to train on: its 1 usable row\(s\) have 1 distinct "
                                         r"prompt\(s\), all held out by held_out_fraction=0.05"):
        load_splits(config)
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n")
    with pytest.raises(InputError, match=r"no usable preferences \(\{'chosen == rejected': 1\}\)"):
        load_splits(config)
