"""Agreement and pair expansion: pure functions against hand-computed examples."""

import math

import pytest

from alignloop.annotate.agreement import (agreement_summary, first_position_bias, kendall_tau_b,
                                          krippendorff_alpha_ordinal, pair_preferences, pairwise_agreement)
from alignloop.annotate.export import expand_pairs, ranking_pairs


def test_pair_preferences_with_a_tie():
    # [[0, 2], 1]: 0 and 2 tie for best, 1 is worst.
    assert pair_preferences([[0, 2], 1]) == {(0, 1): 1, (0, 2): 0, (1, 2): -1}


def test_pairwise_agreement_counts_ties_as_their_own_verdict():
    # a says 0>1, 0>2, 1>2; b says 0>1, 0=2, 2>1: they agree on one pair of three.
    assert pairwise_agreement([0, 1, 2], [[0, 2], 1]) == (1, 3)
    assert pairwise_agreement([[0, 1]], [[0, 1]]) == (1, 1)


def test_kendall_tau_b_hand_computed():
    assert kendall_tau_b([0, 1, 2], [1, 0, 2]) == pytest.approx(1 / 3)  # one discordant pair of three
    # a ties 0 and 1: s = 0 + 1 + 1 = 2; denominator sqrt((3 - 1) * (3 - 0)) = sqrt(6)
    assert kendall_tau_b([[0, 1], 2], [0, 1, 2]) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau_b([[0, 1]], [0, 1]) is None  # one side all ties: undefined


def test_krippendorff_alpha_two_values():
    # o11 = 2, o22 = 2, o12 = o21 = 1; n1 = n2 = 3; delta^2(1,2) = (6 - 3)^2 = 9
    # D_o = 2 * 9 = 18, D_e = 2 * 3 * 3 * 9 / 5 = 32.4, alpha = 1 - 18 / 32.4 = 4/9
    assert krippendorff_alpha_ordinal([[1, 1], [2, 2], [1, 2]]) == pytest.approx(4 / 9)


def test_krippendorff_alpha_ordinal_three_values():
    # n(-1) = 1, n(0) = 2, n(1) = 3; delta^2: (-1,0) = 1.5^2, (0,1) = 2.5^2, (-1,1) = 4^2
    # D_o = 2 * 2.25 + 2 * 6.25 = 17; D_e = 2 * (1*2*2.25 + 2*3*6.25 + 1*3*16) / 5 = 36; alpha = 19/36
    assert krippendorff_alpha_ordinal([[-1, 0], [0, 1], [1, 1], [5]]) == pytest.approx(19 / 36)
    assert krippendorff_alpha_ordinal([[1, 1], [2, 2]]) == pytest.approx(1.0)
    assert krippendorff_alpha_ordinal([[1, 1], [1, 1]]) is None  # no variation: undefined


def test_agreement_summary_per_annotator():
    answers = [("i1", "ann", [0, 1]), ("i1", "bob", [0, 1]), ("i1", "cat", [1, 0]), ("i2", "ann", [1, 0])]
    s = agreement_summary(answers)
    # item i1: ann-bob agree, ann-cat and bob-cat disagree: 1 of 3; i2 has one answer.
    assert s["pairwise"] == pytest.approx(1 / 3) and s["pairs_compared"] == 3
    assert s["per_annotator"] == {"ann": 0.5, "bob": 0.5, "cat": 0.0}
    assert s["tau_b"] == pytest.approx((1 - 1 - 1) / 3)


def test_leave_one_out_consensus():
    # ann, bob, cat say 0 > 1; dan says 1 > 0. For ann the others sum to +1 (agree); for dan to +3 (disagree).
    # On i2, eve alone: no others, not counted. With two people the consensus is the other person.
    answers = [("i1", w, [0, 1]) for w in ("ann", "bob", "cat")] + [("i1", "dan", [1, 0]), ("i2", "eve", [0, 1]),
                                                                     ("i3", "ann", [[0, 1]]), ("i3", "dan", [1, 0])]
    s = agreement_summary(answers)["per_annotator_consensus"]
    assert s == {"ann": 0.5, "bob": 1.0, "cat": 1.0, "dan": 0.0}


def test_first_position_bias():
    # answer 1: position 0 shows response 2, ranked best; answer 2: shows 0, ranked last. Chance: 1/2 each.
    r = first_position_bias([([2, [0, 1]], [2, 0, 1]), ([1, 0], [0, 1])])
    assert r == {"first_shown_best": 0.5, "chance": pytest.approx((1 / 3 + 1 / 2) / 2)}


def test_ranking_pairs_policies():
    assert ranking_pairs([[0, 2], 1], "all") == [(0, 1, False), (2, 1, False), (0, 2, True)]
    assert ranking_pairs([0, [1, 2], 3], "best_vs_rest") == [(0, 1, False), (0, 2, False), (0, 3, False)]
    assert ranking_pairs([0, [1, 2], 3], "adjacent") == [(0, 1, False), (0, 2, False), (1, 3, False), (2, 3, False),
                                                         (1, 2, True)]


def test_expand_pairs_tie_policies_and_margin():
    row = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0, 2], 1], "item_id": "x", "annotator": "ann",
           "strength": 2}
    drop = expand_pairs([row], "all", "drop")
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in drop] == [("a", "b", 2.0), ("c", "b", 2.0)]
    half = expand_pairs([row], "all", "half")
    assert [(p["chosen"], p["rejected"]) for p in half[2:]] == [("a", "c"), ("c", "a")]
    assert all(p["tie"] and p["margin"] == 0.0 for p in half[2:])
    all_bad = {**row, "ranking": [[0, 1, 2]], "strength": None}
    assert expand_pairs([all_bad]) == []
