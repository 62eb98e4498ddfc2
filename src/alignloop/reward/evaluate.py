"""`alignloop reward eval`: how well a reward model predicts held-out preferences.

Figures, all over the strictly ordered comparisons of the data (a pair is one,
a ranking of K gives up to C(K,2)):
- accuracy: share where the better response scores higher (a score tie counts half);
- loss: the training loss (mean per item of the K-way Bradley–Terry loss), raw scores;
- mean_margin: mean raw r_better - r_worse;
- calibration: the model's P(better wins) = σ(r_b - r_w) says how sure it is;
  binned by confidence max(p, 1-p), each bin's accuracy should match its confidence
  (table + PNG, and the expected calibration error);
- agreement: where several annotators labelled the same item (the annotation
  app's export carries item_id and annotator), how often two annotators agree
  with each other vs how often the RM agrees with an annotator (InstructGPT's check:
  an RM cannot be expected to beat people's own agreement).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import StageConfig
from ..errors import InputError
from ..modeling import check_model_dir
from ..prompts import encode_prompt, encode_response
from ..stage import StageContext, run_stage
from .data import Preference, read_preferences
from .losses import kway_ranking_loss
from .model import RewardModel


@dataclass
class RewardEvalConfig(StageConfig):
    reward_model: Path = Path("runs/demo/reward_model")
    data: Path = Path("runs/demo/preferences_held_out.jsonl")  # pairs and/or rankings
    out_dir: Path | None = None  # None: <reward_model>/eval
    bins: int = 10
    batch_size: int = 64
    max_length: int = 256  # longer items are skipped and counted (the backbone's context may be shorter)
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        check_model_dir(self.reward_model)
        if not Path(self.data).exists():
            raise InputError(self.data, "no such file or directory")
        if self.out_dir is None:
            self.out_dir = Path(self.reward_model) / "eval"
        self.require(self.bins >= 1 and self.batch_size >= 1, "bins and batch_size must be >= 1")


def calibration_table(probs: list[float], bins: int = 10) -> dict:
    """Bins of confidence max(p, 1-p) in [0.5, 1]; p is the model's P(the better response wins).

    Each bin: count, mean confidence, accuracy (share where p > 0.5; p == 0.5 counts half).
    ECE: count-weighted mean |accuracy - confidence|.
    """
    rows = [{"lo": 0.5 + 0.5 * b / bins, "hi": 0.5 + 0.5 * (b + 1) / bins, "count": 0, "conf_sum": 0.0, "correct": 0.0}
            for b in range(bins)]
    for p in probs:
        conf = max(p, 1 - p)
        b = min(int((conf - 0.5) / 0.5 * bins), bins - 1)
        rows[b]["count"] += 1
        rows[b]["conf_sum"] += conf
        rows[b]["correct"] += 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0
    table, ece = [], 0.0
    for r in rows:
        n = r["count"]
        conf = r["conf_sum"] / n if n else None
        acc = r["correct"] / n if n else None
        table.append({"lo": round(r["lo"], 4), "hi": round(r["hi"], 4), "count": n, "confidence": conf, "accuracy": acc})
        if n:
            ece += n / len(probs) * abs(acc - conf)
    return {"bins": table, "ece": ece if probs else None}


def plot_calibration(calibration: dict, path: Path, title: str = "reward model calibration") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    rows = [r for r in calibration["bins"] if r["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0.5, 1], [0.5, 1], "--", color="grey", label="perfect calibration")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", label="reward model")
    for r in rows:
        ax.annotate(str(r["count"]), (r["confidence"], r["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("confidence  max(σ(Δr), 1-σ(Δr))")
    ax.set_ylabel("accuracy")
    ece = calibration["ece"]
    ax.set_title(f"{title}\nECE {ece:.3f}" if ece is not None else title, fontsize=9)
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, dpi=120)


def annotator_agreement(items: list[Preference], score: dict[tuple[str, str], float]) -> dict | None:
    """Agreement between annotators vs between the RM and annotators, on comparisons labelled by >= 2 people.

    A comparison is (item, unordered pair of responses); an annotator's label is
    the response they ranked strictly higher. Annotator agreement: share of
    pairs of labels (from different annotators) that pick the same response.
    RM agreement: share of those labels whose response the RM scores higher.
    """
    labels: dict[tuple, list[tuple[str, str]]] = defaultdict(list)  # key -> [(annotator, winner text)]
    for it in items:
        if it.annotator is None:
            continue
        key_item = it.item_id or it.prompt
        for i, j in it.comparisons():
            a, b = it.responses[i], it.responses[j]
            labels[(key_item, it.prompt, frozenset((a, b)))].append((it.annotator, a))
    agree = pairs = rm_agree = judged = 0
    items_seen = set()
    for (key_item, prompt, texts), votes in labels.items():
        if len({who for who, _ in votes}) < 2:
            continue
        items_seen.add(key_item)
        for (w1, t1), (w2, t2) in itertools.combinations(votes, 2):
            if w1 != w2:
                pairs += 1
                agree += t1 == t2
        for _, winner in votes:
            loser = next(iter(texts - {winner}))
            judged += 1
            rm_agree += score[(prompt, winner)] > score[(prompt, loser)]
    if not judged:
        return None
    return {"items": len(items_seen), "labels": judged, "annotator_agreement": agree / max(pairs, 1),
            "rm_agreement": rm_agree / judged}


def preference_metrics(rm: RewardModel, items: list[Preference], batch_size: int = 64,
                       max_length: int | None = None, bins: int = 10) -> dict:
    """Accuracy, loss, mean margin, calibration and agreement of `rm` on `items` (raw scores)."""
    if max_length is not None:
        tok = rm.tokenizer
        fits = lambda it: all(len(encode_prompt(tok, it.prompt)) + len(encode_response(tok, r)) <= max_length
                              for r in it.responses)
        kept = [it for it in items if fits(it)]
    else:
        kept = list(items)
    # Each distinct (prompt, response) is scored once, however many items or annotators repeat it.
    unique = list(dict.fromkeys((it.prompt, r) for it in kept for r in it.responses))
    raw = rm.score([p for p, _ in unique], [r for _, r in unique], batch_size, normalize=False) if unique else []
    score = dict(zip(unique, raw))

    losses, diffs = [], []
    for it in kept:
        s = torch.tensor([[score[(it.prompt, r)] for r in it.responses]])
        margin = torch.tensor([it.margin]) if it.margin is not None else None
        losses.append(float(kway_ranking_loss(s, torch.tensor([it.ranks]), margin=margin)[0]))
        diffs += [float(s[0, i] - s[0, j]) for i, j in it.comparisons()]
    probs = [1 / (1 + math.exp(-d)) if d > -700 else 0.0 for d in diffs]
    return {
        "items": len(kept),
        "comparisons": len(diffs),
        "dropped_too_long": len(items) - len(kept),
        "accuracy": sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / max(len(diffs), 1),
        "loss": sum(losses) / max(len(losses), 1),
        "mean_margin": sum(diffs) / max(len(diffs), 1),
        "calibration": calibration_table(probs, bins),
        "agreement": annotator_agreement(kept, score),
    }


class RewardEvalStage:
    name = "reward_eval"
    config_class = RewardEvalConfig

    def outputs(self, config: RewardEvalConfig) -> dict[str, Path]:
        return {"calibration_png": Path(config.out_dir) / "calibration.png"}

    def run(self, config: RewardEvalConfig, ctx: StageContext) -> dict[str, Any]:
        device, precision = ctx.device_and_precision(config)
        rm = RewardModel.from_pretrained(config.reward_model, device, precision)
        data = read_preferences(config.data)
        metrics = preference_metrics(rm, data.items, config.batch_size, config.max_length, config.bins)
        plot = plot_calibration(metrics["calibration"], self.outputs(config)["calibration_png"],
                                f"{Path(config.reward_model).name} on {Path(config.data).name}")
        return {"reward_model": str(config.reward_model), "data": data.summary(), **metrics,
                "calibration_png": str(plot), "precision": precision}


STAGE = RewardEvalStage()


def evaluate_reward_model(config: RewardEvalConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Accuracy, loss, margin, calibration and agreement on held-out preferences; writes `out_dir`."""
    return run_stage(STAGE, config, ctx)
