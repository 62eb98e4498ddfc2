"""Which units of text can a linear reward model learn the preference from? Bag-of-features baselines.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reward_token_baselines.py \
        --data runs/reward/sft_k4_20000 --model runs/demo/sft [--vocab-sizes 2048,8192]

Fits `reward_curve.bag_of_features_baseline` (a linear Bradley-Terry model: one learned weight per
unit, summed over a response) to every training comparison of DATA/train.jsonl and reports its
held-out accuracy on DATA/held_out.jsonl (against the noisy labels and against the noise-free
VADER order) for each way of cutting the responses into units:
- words: lower-cased, cased, and cased with the leading space kept (VADER reads lower-cased words);
- the tokens of MODEL's own tokenizer;
- the tokens of byte-level BPE tokenizers of each size in --vocab-sizes, trained like the embedded
  default's (`alignloop.tokenizer.train_tokenizer` on the pretraining split of the corpus), as read
  (cased) and on lower-cased text.
The gap between the words and a tokenizer says how much the tokenizer's pieces hide from a model that
adds them up; a reward model on that tokenizer's backbone has been seen to track it (docs/reward.md).
Slow on a 2-core CPU (tens of minutes): the tokenizers train in seconds, but each fit is 300 full-batch
Adam steps, and the word fits have ~190 k distinct units (the SFT model makes words up).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inputs import ROOT, ensure_reward_data  # noqa: E402
from reward_curve import bag_of_features_baseline, token_units, words_of  # noqa: E402

from alignloop.corpus import load_corpus, split_corpus  # noqa: E402
from alignloop.jsonl import read_jsonl  # noqa: E402
from alignloop.modeling import load_tokenizer  # noqa: E402
from alignloop.pretrain import PretrainConfig  # noqa: E402
from alignloop.reward.data import read_preferences  # noqa: E402
from alignloop.tokenizer import train_tokenizer  # noqa: E402

CASED_WORD = re.compile(r"[A-Za-z']+|[!?]")
SPACED_WORD = re.compile(r" ?[A-Za-z']+| ?[!?]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs/reward/data",
                        help="a benchmarks/reward_data.py output directory (built from --model when missing)")
    parser.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft",
                        help="the backbone whose tokenizer to compare")
    parser.add_argument("--vocab-sizes", default="2048,8192")
    args = parser.parse_args()
    ensure_reward_data(args.model, args.data)

    items = read_preferences(args.data / "train.jsonl").items
    held_rows = read_jsonl(args.data / "held_out.jsonl")
    units = {"words, lower-cased": words_of, "words, cased": CASED_WORD.findall,
             "words, cased, leading space": SPACED_WORD.findall,
             f"{args.model}'s tokens": token_units(load_tokenizer(args.model), lower=False)}
    defaults = PretrainConfig()
    train_docs, _ = split_corpus(load_corpus(), defaults.held_out_fraction, defaults.seed)  # as pretrain splits it
    for size in (int(s) for s in args.vocab_sizes.split(",")):
        units[f"BPE {size}"] = token_units(train_tokenizer(train_docs, size), lower=False)
        units[f"BPE {size}, lower-cased"] = token_units(train_tokenizer([d.lower() for d in train_docs], size), lower=True)

    results = []
    for name, unit_function in units.items():
        fit = bag_of_features_baseline(items, held_rows, features=unit_function)
        results.append({"units": name, **fit})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{len(items)} training items, {results[0]['train_comparisons']} comparisons, {len(held_rows)} held-out pairs\n")
    print("| units | distinct units | held-out accuracy | vs noise-free VADER |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['units']} | {r['features']:,} | {r['accuracy']:.3f} | {r['clean_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
