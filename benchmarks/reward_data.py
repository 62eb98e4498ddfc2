"""Preference pairs with a known preference, for the reward-model benchmarks.

Two sources of response pairs (`--source`):
- `sft`: the SFT model samples two responses per prompt (`alignloop.generation.generate`,
  T = 1, 64 new tokens): the kind of text PPO will show the RM. Training pairs come from
  the SFT training prompts, held-out pairs from the SFT held-out prompts.
- `corpus`: real quotations (Debian's fortunes, split exactly as pretraining and SFT split
  them, so held-out texts were never trained on): the prompt is the first 2-6 words of one
  quotation, the two responses are its own continuation and the continuation of the next
  quotation. Needs no sampling, and VADER's sentiment of real English is meaningful.
A simulated annotator labels each pair by VADER's compound sentiment of
the response (`alignloop.labelers.vader_sentiment`) with label noise
(`noisy_preference`: with probability `noise` the person answers by coin flip),
pairs whose sentiments differ by at most `tie_threshold` are ties and dropped
(counted).

With `--k K` (K > 2, `sft` source) the SFT model samples K responses per prompt.
Training rows are then rankings, labelled by the annotation app's own simulated person
(`alignloop.annotate.simulate.label_answerer`: VADER order with Gumbel noise, equal
sentiments tied), so the K-way loss scores each response once for its C(K,2) comparisons;
held-out rows stay pairs (responses 0-1, 2-3, ... of each held-out prompt) so accuracy
means the same thing at every K.

With `--source corpus --k K` (K > 2) each training prompt gets its own continuation and the
continuations of K - 1 other training quotations, ranked by the same simulated person; with
`--all-cuts` every cut of each training quotation is a prompt (about 4 per quotation; the texts
repeat across rankings, unlike SFT samples). `--held-out-pairs N` draws N random pairs of
held-out continuations (one random cut per held-out quotation) instead of one pair per quotation,
for smaller error bars.

With `--all-cuts` (`sft` source) the training prompts are every cut of each SFT training
quotation after its first 2, 3, ... 6 words (at most half its words), about 4 per quotation,
instead of the one random cut the SFT model was trained on: more distinct prompts, hence more
distinct responses, from the same quotations. Held-out prompts are unchanged (the SFT held-out
quotations, which no training prompt comes from), and the order is shuffled so that the first
N prompts spread over the quotations.

    .venv/bin/python benchmarks/reward_data.py [--source corpus|sft] [--model runs/demo/sft] \
        [--train-prompts 3000] [--k 2] [--out runs/reward/data]

Writes train.jsonl and held_out.jsonl ({"prompt", "chosen", "rejected", "vader_chosen",
"vader_rejected"}: the extra keys are ignored by the reader, and let scripts compute
accuracy against the noise-free preference) and summary.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from alignloop.device import choose_precision, resolve_device, set_cpu_threads
from alignloop.generation import SamplingSettings, generate
from alignloop.jsonl import write_jsonl
from alignloop.labelers import noisy_preference, vader_sentiment
from alignloop.modeling import load_causal_lm, load_tokenizer
from alignloop.prompts import read_prompts

ROOT = Path(__file__).resolve().parents[1]


def label_pairs(prompts: list[str], first: list[str], second: list[str], rng: random.Random, noise: float,
                tie_threshold: float) -> tuple[list[dict], dict]:
    """Simulated annotator: the response with the higher VADER sentiment wins, with label noise."""
    sa, sb = vader_sentiment(prompts, first), vader_sentiment(prompts, second)
    rows, counts = [], {"pairs": 0, "ties_dropped": 0, "identical_dropped": 0, "flipped_by_noise": 0}
    for p, a, b, x, y in zip(prompts, first, second, sa, sb):
        if a == b or not a.strip() or not b.strip():
            counts["identical_dropped"] += 1
            continue
        if abs(x - y) <= tie_threshold:
            counts["ties_dropped"] += 1  # an annotator cannot tell them apart: no preference to learn
            continue
        verdict = noisy_preference(x, y, rng, noise)
        chosen, rejected, vc, vr = (a, b, x, y) if verdict == 0 else (b, a, y, x)
        counts["flipped_by_noise"] += vc < vr
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected, "vader_chosen": vc, "vader_rejected": vr})
    counts["pairs"] = len(rows)
    return rows, counts


def sample_k(model, tokenizer, prompts: list[str], k: int, seed: int, precision: str,
             batch_size: int = 64) -> list[list[str]]:
    """k independent samples per prompt (T = 1, 64 new tokens): samples[j][i] is prompt i's j-th."""
    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=64, batch_size=batch_size, seed=seed)
    out = generate(model, tokenizer, prompts * k, settings, precision)
    n = len(prompts)
    return [[c.completion for c in out[j * n:(j + 1) * n]] for j in range(k)]


def label_rankings(prompts: list[str], samples: list[list[str]], rng: random.Random,
                   noise: float) -> tuple[list[dict], dict]:
    """Rank-K rows from the annotation app's simulated person; duplicate texts kept once."""
    from alignloop.annotate.simulate import label_answerer

    answer = label_answerer("vader", noise, "rank")
    rows, counts = [], {"rankings": 0, "comparisons": 0, "dropped_fewer_than_two_distinct": 0,
                        "dropped_all_tied": 0}
    for i, prompt in enumerate(prompts):
        responses = list(dict.fromkeys(s[i] for s in samples if s[i].strip()))
        if len(responses) < 2:
            counts["dropped_fewer_than_two_distinct"] += 1
            continue
        ranking = answer(prompt, responses, rng)
        if len(ranking) < 2:
            counts["dropped_all_tied"] += 1
            continue
        sizes = [len(g) if isinstance(g, list) else 1 for g in ranking]
        counts["comparisons"] += (sum(sizes) ** 2 - sum(n * n for n in sizes)) // 2
        rows.append({"prompt": prompt, "responses": responses, "ranking": ranking})
    counts["rankings"] = len(rows)
    return rows, counts


def corpus_responses(docs: list[str], n: int, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """Prompt = the start of quotation i; responses = its continuation and quotation i+1's (texts reused once)."""
    from alignloop.sft import corpus_pairs

    pairs = corpus_pairs([d for d in docs if len(d) <= 280], rng, 2, 6)[:n + 1]
    firsts, seconds = pairs[:-1], pairs[1:]  # every quotation gives a prompt; its neighbour the other response
    return [p["prompt"] for p in firsts], [p["response"] for p in firsts], [p["response"] for p in seconds]


def corpus_cuts(docs: list[str], rng: random.Random, every_cut: bool, max_chars: int = 280,
                min_words: int = 2, max_words: int = 6) -> list[tuple[int, str, str]]:
    """(quotation index, prompt, continuation) for the quotations SFT keeps (<= max_chars characters):
    one random cut after min_words..max_words words of each, or every cut."""
    from alignloop.sft import prompt_cuts

    cuts = []
    for index, doc in enumerate(docs):
        if len(doc) > max_chars:
            continue
        words = doc.split(" ")
        ks = list(prompt_cuts(words, min_words, max_words))
        if ks and not every_cut:
            ks = [rng.choice(ks)]
        cuts += [(index, " ".join(words[:k]), " " + " ".join(words[k:])) for k in ks]
    return cuts


def corpus_rankings(docs: list[str], n: int, k: int, rng: random.Random, every_cut: bool) -> tuple[list[str], list[list[str]]]:
    """Prompts and k responses each (samples[j][i], as `sample_k` returns them): a prompt's own
    continuation first, then k - 1 continuations of other quotations."""
    cuts = corpus_cuts(docs, rng, every_cut)
    rng.shuffle(cuts)  # the first n prompts spread over the quotations
    cuts = cuts[:n]
    prompts, samples = [], [[] for _ in range(k)]
    for index, prompt, continuation in cuts:
        prompts.append(prompt)
        samples[0].append(continuation)
        for j in range(1, k):
            other = rng.choice(cuts)
            while other[0] == index:
                other = rng.choice(cuts)
            samples[j].append(other[2])
    return prompts, samples


def corpus_random_pairs(docs: list[str], n: int, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """n pairs of two different quotations' continuations (one random cut each), the first one's prompt."""
    cuts = corpus_cuts(docs, rng, every_cut=False)
    prompts, first, second = [], [], []
    for _ in range(n):
        i, j = rng.sample(range(len(cuts)), 2)
        prompts.append(cuts[i][1])
        first.append(cuts[i][2])
        second.append(cuts[j][2])
    return prompts, first, second


def make_corpus_data(n_train: int, n_held: int, out: Path, noise: float = 0.1, tie_threshold: float = 0.05,
                     seed: int = 0, k: int = 2, all_cuts: bool = False, held_out_pairs: int | None = None) -> dict:
    from alignloop.corpus import load_corpus, split_corpus

    start = time.time()
    train_docs, held_docs = split_corpus(load_corpus(), 0.05, 0)  # pretraining's and SFT's split
    rng = random.Random(seed)
    summary = {"source": "corpus", "noise": noise, "tie_threshold": tie_threshold, "seed": seed, "k": k,
               "all_cuts": all_cuts, "held_out_pairs": held_out_pairs}
    if k == 2 and not all_cuts and held_out_pairs is None:  # the first corpus data: neighbouring quotations paired
        for split, docs, n in (("held_out", held_docs, n_held), ("train", train_docs, n_train)):
            prompts, a, b = corpus_responses(docs, n, rng)
            rows, counts = label_pairs(prompts, a, b, rng, noise, tie_threshold)
            write_jsonl(out / f"{split}.jsonl", rows)
            summary[split] = {"prompts": len(prompts), **counts}
    else:
        prompts, samples = corpus_rankings(train_docs, n_train, k, rng, all_cuts)
        if k > 2:
            rows, counts = label_rankings(prompts, samples, rng, noise)
        else:
            rows, counts = label_pairs(prompts, samples[0], samples[1], rng, noise, tie_threshold)
        write_jsonl(out / "train.jsonl", rows)
        summary["train"] = {"prompts": len(prompts), **counts}
        if held_out_pairs is None:
            prompts, a, b = corpus_responses(held_docs, n_held, rng)
        else:
            prompts, a, b = corpus_random_pairs(held_docs, held_out_pairs, rng)
        rows, counts = label_pairs(prompts, a, b, rng, noise, tie_threshold)
        write_jsonl(out / "held_out.jsonl", rows)
        summary["held_out"] = {"prompts": len(prompts), **counts}
    summary["seconds"] = time.time() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def all_cut_prompts(model_dir: Path, seed: int) -> list[str]:
    """Every 2..6-word cut of each SFT training quotation, with the SFT run's own split and limits."""
    import yaml

    from alignloop.corpus import load_corpus, split_corpus

    sft = yaml.safe_load((model_dir / "alignloop_sftconfig.yaml").read_text())
    if sft.get("data") is not None:
        raise SystemExit(f"--all-cuts needs an SFT model trained on the corpus; {model_dir} was trained on {sft['data']}")
    train_docs, _ = split_corpus(load_corpus(sft["corpus"]), sft["held_out_fraction"], sft["seed"])
    cuts = corpus_cuts(train_docs, random.Random(seed), True, sft["max_response_chars"],  # the quotations SFT kept
                       sft["prompt_words_min"], sft["prompt_words_max"])
    prompts = [prompt for _, prompt, _ in cuts]
    held_out = set(read_prompts(model_dir / "held_out_pairs.jsonl"))  # short cuts ("As for the") recur
    prompts = list(dict.fromkeys(p for p in prompts if p.strip() and p not in held_out))
    random.Random(seed).shuffle(prompts)
    return prompts


def make_data(model_dir: Path, train_prompts: Path, held_prompts: Path, n_train: int, n_held: int, out: Path,
              noise: float = 0.1, tie_threshold: float = 0.05, seed: int = 0, k: int = 2,
              batch_size: int = 64, all_cuts: bool = False, held_out_k: int | None = None) -> dict:
    start = time.time()
    set_cpu_threads()
    device = resolve_device("auto")
    precision = choose_precision(device, "auto")
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device, tokenizer)
    rng = random.Random(seed)
    summary = {"source": "sft", "model": str(model_dir), "noise": noise, "tie_threshold": tie_threshold,
               "seed": seed, "k": k, "held_out_k": held_out_k or k, "all_cuts": all_cuts}
    for split, path, n in (("held_out", held_prompts, n_held), ("train", train_prompts, n_train)):
        prompts = all_cut_prompts(model_dir, seed)[:n] if split == "train" and all_cuts else read_prompts(path, n)
        split_k = k if split == "train" else held_out_k or k
        samples = sample_k(model, tokenizer, prompts, split_k, seed + (split == "train"), precision, batch_size)
        if split == "train" and k > 2:
            rows, counts = label_rankings(prompts, samples, rng, noise)
        else:  # pairs: samples 0-1, 2-3, ... of each prompt
            rows, counts = [], {}
            for j in range(0, split_k - 1, 2):
                pair_rows, pair_counts = label_pairs(prompts, samples[j], samples[j + 1], rng, noise, tie_threshold)
                rows += pair_rows
                counts = {key: counts.get(key, 0) + v for key, v in pair_counts.items()}
        write_jsonl(out / f"{split}.jsonl", rows)
        summary[split] = {"prompts": len(prompts), **counts}
    summary["seconds"] = time.time() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("sft", "corpus"), default="sft")
    parser.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft")
    parser.add_argument("--train-prompts", type=int, default=3000)
    parser.add_argument("--held-out-prompts", type=int, default=800)
    parser.add_argument("--k", type=int, default=2, help="responses per prompt (sft source); K > 2: rankings")
    parser.add_argument("--held-out-k", type=int, default=None,
                        help="responses per held-out prompt (default: --k), paired 0-1, 2-3, ...: more pairs, smaller error bars")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="sequences sampled at once (larger: fewer, wider decode steps, faster on CPU)")
    parser.add_argument("--all-cuts", action="store_true",
                        help="training prompts: every 2-6-word cut of each training quotation (about 4x more)")
    parser.add_argument("--held-out-pairs", type=int, default=None,
                        help="corpus source: this many random pairs of held-out continuations (default: one per quotation)")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--tie-threshold", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/reward/data")
    args = parser.parse_args()
    if args.k < 2:
        parser.error("--k must be >= 2")
    if args.held_out_k is not None and (args.held_out_k < 2 or args.source != "sft"):
        parser.error("--held-out-k must be >= 2 and needs --source sft")
    if args.held_out_pairs is not None and (args.held_out_pairs < 1 or args.source != "corpus"):
        parser.error("--held-out-pairs must be >= 1 and needs --source corpus")
    if args.source == "corpus":
        print(json.dumps(make_corpus_data(args.train_prompts, args.held_out_prompts, args.out, args.noise,
                                          args.tie_threshold, args.seed, args.k, args.all_cuts,
                                          args.held_out_pairs), indent=2))
        return
    summary = make_data(args.model, args.model / "train_prompts.jsonl", args.model / "held_out_pairs.jsonl",
                        args.train_prompts, args.held_out_prompts, args.out, args.noise, args.tie_threshold, args.seed,
                        args.k, args.batch_size, args.all_cuts, args.held_out_k)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
