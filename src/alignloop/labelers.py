"""Label functions: programs that stand in for people when the loop runs unattended.

A label function maps a list of (prompt, response) to one score per response;
higher is preferred. The default is VADER's compound sentiment of the response
(the simulated annotators of the demo prefer positive text). Users plug in their
own as `module:function` or `path/to/file.py:function`.

`noisy_preference` turns two scores into a human-like choice with label noise,
so simulated annotators disagree with each other about as people do.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import random
from pathlib import Path
from typing import Callable, Sequence

from .errors import AlignloopError

LabelFunction = Callable[[Sequence[str], Sequence[str]], list[float]]


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """VADER compound score of each response, in [-1, 1]."""
    analyzer = _vader()
    return [analyzer.polarity_scores(r)["compound"] for r in responses]


@functools.lru_cache(maxsize=1)
def _afinn():
    from afinn import Afinn

    return Afinn(language="en", emoticons=True)


def afinn_sentiment(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """AFINN score of each response: the sum of its words' (and emoticons') valences, each -5..+5."""
    afinn = _afinn()
    return [float(afinn.score(r)) for r in responses]


BUILTIN: dict[str, LabelFunction] = {"vader": vader_sentiment, "afinn": afinn_sentiment}


def load_label_function(spec: str) -> LabelFunction:
    """`vader`, `package.module:function` or `path/to/file.py:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    target, sep, attr = spec.rpartition(":")
    if not sep:
        raise AlignloopError(f"label function '{spec}': expected one of {sorted(BUILTIN)} or 'module:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise AlignloopError(f"label function '{spec}': no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except (ImportError, ValueError, TypeError) as e:  # ValueError, TypeError: '' or a relative name like '.x'
        raise AlignloopError(f"label function '{spec}': cannot import {target} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AlignloopError(f"label function '{spec}': {target} has no function '{attr}'")
    return fn


def noisy_preference(score_a: float, score_b: float, rng: random.Random, noise: float = 0.1,
                     tie_threshold: float = 0.0) -> int:
    """Which of a and b a simulated person prefers: 0 for a, 1 for b, -1 for a tie.

    `noise` is the probability that the person answers at random (a coin flip),
    the simplest model of inattentive or disagreeing annotators; scores within
    `tie_threshold` of each other are called a tie.
    """
    if rng.random() < noise:
        return rng.randrange(2)
    if abs(score_a - score_b) <= tie_threshold:
        return -1
    return 0 if score_a > score_b else 1


def noisy_ranking(scores: Sequence[float], rng: random.Random, noise: float = 0.1) -> list[int]:
    """A best-first order of response indices: the true order with Gumbel noise.

    With noise 0 it is the exact sort by score; larger noise swaps close
    responses more often than far ones, as people do.
    """
    if noise <= 0:
        keyed = [(s, rng.random()) for s in scores]
    else:
        keyed = [(s - noise * math.log(-math.log(rng.random() + 1e-12) + 1e-12), 0.0) for s in scores]
    return sorted(range(len(scores)), key=lambda i: keyed[i], reverse=True)
