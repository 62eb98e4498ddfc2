"""Sampling throughput: alignloop's KV-cache sampler vs Hugging Face `model.generate`, one run.

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/sampling_vs_hf.py \
        [--model runs/demo/sft] [--prompts 512] [--batch-sizes 8,64] [--max-new-tokens 64]

Both sample the same prompts (the SFT model's training prompts, formatted with
`alignloop.prompts.encode_prompt`, left-padded, batches sorted by prompt length) at T = 1,
top_p = 1, up to `--max-new-tokens` tokens, stopping a row at EOS, with the same model in
the same precision (`choose_precision`'s probe). alignloop runs `generation.generate`, the
sampler that `alignloop sample`, evaluation and PPO's rollouts use; HF runs `model.generate`
with `do_sample=True` on the same padded batches. Prints responses/s and generated tokens/s
for each (the tokens each side actually produced: the samples differ, their length
distributions do not), and the ratio. Also runs alignloop with rows kept until the whole batch
has ended (`compact_fraction=0`), so the effect of dropping ended rows is measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from alignloop.device import autocast, choose_precision, set_cpu_threads
from alignloop.generation import SamplingSettings, generate
from alignloop.modeling import load_causal_lm, load_tokenizer
from alignloop.prompts import encode_prompt, read_prompts
from alignloop.rollout import left_pad, response_mask_up_to_eos

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import need  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def hf_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                precision: str) -> tuple[int, int]:
    """(responses, generated tokens up to and including EOS) from `model.generate`, batches as alignloop's."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    eos, tokens = tokenizer.eos_token_id, 0
    torch.manual_seed(0)
    for start in range(0, len(order), batch_size):
        batch = [encode_prompt(tokenizer, prompts[i]) for i in order[start:start + batch_size]]
        ids, mask = left_pad(batch, tokenizer.pad_token_id, torch.device("cpu"))
        with torch.no_grad(), autocast(torch.device("cpu"), precision):
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        tokens += int(response_mask_up_to_eos(out[:, ids.shape[1]:], eos).sum())
    return len(prompts), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--batch-sizes", default="8,64")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/sampling_vs_hf.json")
    args = parser.parse_args()

    need(args.model / "config.json", "SFT model", "make demo")
    set_cpu_threads()
    device = torch.device("cpu")
    precision = choose_precision(device, "auto")
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, device, tokenizer)
    prompts = read_prompts(args.model / "train_prompts.jsonl", args.prompts)
    print(f"{len(prompts)} prompts, {torch.get_num_threads()} threads, {precision}")

    results = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        runs = {}
        for name, compact in (("alignloop", 0.25), ("alignloop, no row dropping", 0.0)):
            settings = SamplingSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size, seed=0)
            start = time.perf_counter()
            out = generate(model, tokenizer, prompts, settings, precision, show_progress=False,
                           compact_fraction=compact)
            seconds = time.perf_counter() - start
            runs[name] = (seconds, len(out), sum(len(c.token_ids) for c in out))
        start = time.perf_counter()
        n, tokens = hf_generate(model, tokenizer, prompts, batch_size, args.max_new_tokens, precision)
        runs["HF generate"] = (time.perf_counter() - start, n, tokens)
        hf_rate = runs["HF generate"][1] / runs["HF generate"][0]
        for name, (seconds, n, tokens) in runs.items():
            row = {"batch_size": batch_size, "sampler": name, "seconds": round(seconds, 2),
                   "responses_per_s": round(n / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                   "mean_tokens": round(tokens / n, 1), "vs_hf": round(n / seconds / hf_rate, 2)}
            results.append(row)
            print(f"batch {batch_size:>4}  {name:<27} {row['responses_per_s']:>7.1f} responses/s "
                  f"{row['tokens_per_s']:>8.1f} tokens/s  mean {row['mean_tokens']:>5.1f} tokens  "
                  f"{row['vs_hf']:.2f}x HF")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "precision": precision,
                                    "prompts": len(prompts), "results": results}, indent=2))
    for row in results:  # HF generate has one setting here: the same precision and batch as ours
        if row["sampler"] == "alignloop":
            print(f"batch {row['batch_size']}: alignloop / best HF generate = {row['vs_hf']:.2f}x")


if __name__ == "__main__":
    main()
