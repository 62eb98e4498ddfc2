"""The linear bag-of-features baseline of `benchmarks/reward_curve.py`, on cases worked by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reward_curve import bag_of_features_baseline  # noqa: E402

from alignloop.reward.data import Preference  # noqa: E402


def test_bag_of_words_learns_seen_words_and_ties_unseen_ones():
    # Training: "good" always beats "bad" (one pair, and a rank-3 set with "fine" in between).
    train = [Preference("p", ["a good day", "a bad day"], [0, 1]),
             Preference("q", ["good", "fine", "bad"], [0, 1, 2])]
    held = [
        # seen words, VADER agrees with the label: counted right both ways
        {"chosen": "good night", "rejected": "bad night", "vader_chosen": 0.4, "vader_rejected": -0.5},
        # seen words, a noisy label: wrong against the label, right against VADER
        {"chosen": "bad news", "rejected": "good news", "vader_chosen": -0.5, "vader_rejected": 0.4},
        # words no training text holds: both weights 0, a tie, half a point against the label
        {"chosen": "great", "rejected": "awful", "vader_chosen": 0.6, "vader_rejected": -0.5},
    ]
    out = bag_of_features_baseline(train, held)
    assert out["train_comparisons"] == 4  # 1 pair + C(3, 2) ordered pairs of the ranking
    assert out["features"] == 5  # a, good, day, bad, fine
    assert out["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["clean_accuracy"] == pytest.approx((1 + 1 + 0) / 3)  # a tie does not agree with a strict VADER order


def test_bag_of_features_takes_any_split_of_the_text():
    # Characters as features: "x" beats "y" in training, so "xx" beats "yy" on held-out; "z" is unseen.
    train = [Preference("p", ["x", "y"], [0, 1])]
    held = [{"chosen": "xx", "rejected": "yy", "vader_chosen": 1.0, "vader_rejected": 0.0},
            {"chosen": "z", "rejected": "zz", "vader_chosen": 1.0, "vader_rejected": 0.0}]
    out = bag_of_features_baseline(train, held, features=list)
    assert out["features"] == 2
    assert out["accuracy"] == pytest.approx((1 + 0.5) / 2)
