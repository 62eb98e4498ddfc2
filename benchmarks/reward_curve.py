"""Held-out accuracy of the reward model against training-set size.

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/reward_curve.py \
        [--model runs/demo/sft] [--data runs/reward/data] [--sizes 125,250,500,1000,2000,4000]

For each size N, trains a fresh reward model (`alignloop.reward.train_reward_model`, the
default config but for the overrides printed) on the first N items of DATA/train.jsonl
(`benchmarks/reward_data.py`: SFT samples labelled by VADER sentiment with label noise;
an item is a pair, or with `--k 4` data a ranking of 4 responses, and the curve's x axis
counts the comparisons the items hold: 1 per pair, C(K,2) less ties per ranking)
and evaluates it on DATA/held_out.jsonl: accuracy against the (noisy) held-out labels, as
`alignloop reward eval` reports it, and against the noise-free VADER order. Beside it, the same
accuracies of a bag-of-words Bradley-Terry model fit to the same comparisons
(`bag_of_features_baseline`): what the training texts' words alone can teach; and of the same
model over the reward model's own tokens instead of words. Writes
OUT/reward_curve.json, OUT/reward_curve.png and, for the largest size, the calibration plot.
Accuracies do not depend on the machine; the seconds do.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import ensure_reward_data  # noqa: E402

from alignloop.jsonl import read_jsonl, write_jsonl  # noqa: E402
from alignloop.reward.evaluate import plot_calibration, preference_metrics  # noqa: E402
from alignloop.reward.losses import bradley_terry_loss  # noqa: E402
from alignloop.reward.data import read_preferences  # noqa: E402
from alignloop.reward.model import RewardModel  # noqa: E402
from alignloop.reward.train import RewardTrainConfig, train_reward_model  # noqa: E402
from alignloop.modeling import load_tokenizer  # noqa: E402


WORD = re.compile(r"[a-z']+|[!?]")


def words_of(text: str) -> list[str]:
    """Lower-cased words (and "!", "?"), the units VADER's lexicon scores."""
    return WORD.findall(text.lower())


def token_units(tokenizer, lower: bool = False) -> Callable[[str], list[int]]:
    """A text's token ids under `tokenizer` (optionally of the lower-cased text), as features."""
    def units(text: str) -> list[int]:
        return tokenizer(text.lower() if lower else text, add_special_tokens=False)["input_ids"]
    return units


def bag_of_features_baseline(train_items: list, held_rows: list[dict], features: Callable[[str], list[str]] = words_of,
                          steps: int = 300, l2: float = 1e-5) -> dict:
    """Held-out accuracy of a linear model of feature counts fit to the same training comparisons.

    Score = the sum of a learned weight per feature (by default a lower-cased word; or the reward
    model's own tokens), fit by Bradley-Terry (`bradley_terry_loss` over every strictly ordered
    training comparison, full-batch Adam, a small L2). VADER itself is nearly such a model over words
    (a sum of lexicon valences, with rules for negation and emphasis), so with words this baseline
    says how much of the preference the training texts can teach: a word no training text holds
    gets weight 0. With the model's tokens it says what a bag of the pieces the network reads gets.
    Returns accuracies against the held-out labels (a 0-0 tie counts half) and against the
    noise-free VADER order.
    """
    vocab: dict[str, int] = {}

    def count_difference(pairs: list[tuple[str, str]], grow: bool) -> torch.Tensor:
        rows, cols, values = [], [], []  # row n: counts(better) - counts(worse)
        for n, (better, worse) in enumerate(pairs):
            for text, sign in ((better, 1.0), (worse, -1.0)):
                units = features(text)
                if grow:
                    for u in units:
                        vocab.setdefault(u, len(vocab))
                ids = [vocab[u] for u in units if u in vocab]
                rows += [n] * len(ids)
                cols += ids
                values += [sign] * len(ids)
        return torch.sparse_coo_tensor([rows, cols], values, (len(pairs), len(vocab)),
                                       check_invariants=True).coalesce()

    train_pairs = [(item.responses[i], item.responses[j]) for item in train_items for i, j in item.comparisons()]
    train_diff = count_difference(train_pairs, grow=True)
    held_diff = count_difference([(r["chosen"], r["rejected"]) for r in held_rows], grow=False)
    weights = torch.zeros(len(vocab), 1, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        margin = torch.sparse.mm(train_diff, weights).squeeze(1)
        loss = bradley_terry_loss(margin, torch.zeros_like(margin)).mean() + l2 * weights.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        held_margin = torch.sparse.mm(held_diff, weights).squeeze(1)
    vader_agrees = torch.tensor([r["vader_chosen"] > r["vader_rejected"] for r in held_rows])
    return {"accuracy": ((held_margin > 0).float() + 0.5 * (held_margin == 0).float()).mean().item(),
            "clean_accuracy": ((held_margin > 0) == vader_agrees).float().mean().item(),
            "train_comparisons": len(train_pairs), "features": len(vocab)}


def clean_accuracy(rm: RewardModel, rows: list[dict]) -> float:
    """Share of held-out pairs where the RM orders the responses as VADER does (no label noise)."""
    first = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows], normalize=False)
    second = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows], normalize=False)
    agree = [(a > b) == (r["vader_chosen"] > r["vader_rejected"]) for a, b, r in zip(first, second, rows)]
    return sum(agree) / len(agree)


def plot_curve(points: list[dict], path: Path, label_agreement: float, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [p["comparisons"] for p in points]
    ax.plot(xs, [p["held_out_accuracy"] for p in points], "o-", label="vs held-out labels (10 % noise)")
    ax.plot(xs, [p["clean_accuracy"] for p in points], "s--", label="vs noise-free VADER order")
    ax.plot(xs, [p["bag_of_words_accuracy"] for p in points], "^:", color="tab:green",
            label="bag-of-words baseline, vs held-out labels")
    ax.plot(xs, [p["bag_of_tokens_accuracy"] for p in points], "x:", color="tab:olive",
            label="bag of the model's tokens, vs held-out labels")
    ax.axhline(label_agreement, color="grey", ls=":", label=f"held-out labels vs VADER ({label_agreement:.2f})")
    ax.axhline(0.5, color="lightgrey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("training comparisons")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_ylim(0.45, 1.0)
    ax.set_title(f"reward model on {model}: held-out accuracy vs data", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/reward/data")
    parser.add_argument("--sizes", default="125,250,500,1000,2000,4000")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=None, help="default: RewardTrainConfig's")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/reward/curve")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_reward_data(args.model, args.data)
    train_rows = read_jsonl(args.data / "train.jsonl")
    held_file = args.data / "held_out.jsonl"
    held_rows = read_jsonl(held_file)
    label_agreement = sum((r["vader_chosen"] > r["vader_rejected"]) for r in held_rows) / len(held_rows)
    sizes = [n for n in (int(s) for s in args.sizes.split(",")) if n <= len(train_rows)]
    if len(train_rows) not in sizes and len(train_rows) > max(sizes, default=0):
        sizes.append(len(train_rows))
    tokenizer = load_tokenizer(args.model)

    overrides = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size)) if v is not None}
    points = []
    for n in sizes:
        subset = args.out / f"train_{n}.jsonl"
        write_jsonl(subset, train_rows[:n])
        out_dir = args.out / f"rm_{n}"
        start = time.time()
        summary = train_reward_model(RewardTrainConfig(model=args.model, data=subset, held_out_data=held_file,
                                                       out_dir=out_dir, epochs=args.epochs, **overrides))
        rm = RewardModel.from_pretrained(out_dir, precision=summary["precision"])
        items = read_preferences(subset).items
        comparisons = sum(len(item.comparisons()) for item in items)
        baseline = bag_of_features_baseline(items, held_rows)
        token_baseline = bag_of_features_baseline(items, held_rows, features=token_units(tokenizer))
        point = {"items": n, "comparisons": comparisons, "steps": summary["steps"], "held_out_accuracy": summary["held_out_accuracy"],
                 "held_out_loss": summary["held_out_loss"], "clean_accuracy": clean_accuracy(rm, held_rows),
                 "bag_of_words_accuracy": baseline["accuracy"], "bag_of_words_clean_accuracy": baseline["clean_accuracy"],
                 "bag_of_tokens_accuracy": token_baseline["accuracy"],
                 "bag_of_tokens_clean_accuracy": token_baseline["clean_accuracy"],
                 "items_per_second": summary["items_per_second"], "seconds": time.time() - start}
        points.append(point)
        print(json.dumps(point), flush=True)
        if n == sizes[-1]:
            metrics = preference_metrics(rm, read_preferences(held_file).items)
            plot_calibration(metrics["calibration"], args.out / "reward_calibration.png",
                             f"RM trained on {n} items, held-out pairs")
            (args.out / "calibration.json").write_text(json.dumps(metrics["calibration"], indent=2))
    result = {"model": str(args.model), "data": str(args.data), "held_out_pairs": len(held_rows),
              "held_out_label_agreement_with_vader": label_agreement, "overrides": overrides,
              "epochs": args.epochs, "points": points}
    (args.out / "reward_curve.json").write_text(json.dumps(result, indent=2))
    plot_curve(points, args.out / "reward_curve.png", label_agreement, f"{args.model.parent.name}/{args.model.name}")
    print("\n| training items | comparisons | steps | held-out accuracy | vs noise-free VADER | held-out loss "
          "| bag of words: accuracy | vs VADER | bag of the model's tokens: accuracy | vs VADER |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['items']} | {p['comparisons']} | {p['steps']} | {p['held_out_accuracy']:.3f} | {p['clean_accuracy']:.3f} | "
              f"{p['held_out_loss']:.3f} | {p['bag_of_words_accuracy']:.3f} | {p['bag_of_words_clean_accuracy']:.3f} | "
              f"{p['bag_of_tokens_accuracy']:.3f} | {p['bag_of_tokens_clean_accuracy']:.3f} |")
    print(f"\nheld-out labels agree with VADER on {label_agreement:.3f} of pairs (label noise).")
    last = points[-1]
    best_baseline = max(last["bag_of_words_accuracy"], last["bag_of_tokens_accuracy"])
    print(f"held-out accuracy at {last['comparisons']} comparisons:")
    print(f"alignloop / best bag-of-features baseline = {last['held_out_accuracy'] / best_baseline:.2f}x")


if __name__ == "__main__":
    main()
