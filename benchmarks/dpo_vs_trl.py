"""DPO training, alignloop vs TRL 1.16's DPOTrainer: same SFT model, same pairs, same settings.

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/dpo_vs_trl.py \
        [--model runs/demo/sft] [--data runs/demo/preferences.jsonl] [--pairs 1000] [--batch-size 32]

1. reads the preferences (by default the demo's: the simulated annotators' rankings of SFT
   samples, every ranked pair of each), holds out 10 % of the prompts, and tokenizes the first
   `--pairs` training pairs once with alignloop's prompt formatting, so both trainers see
   identical token sequences (prompt + response + EOS); pairs longer than max_length are left out
   on both sides;
2. measures the machine's ceiling (`benchmarks/ceiling.py`): matmul FLOP/s of a plain
   forward+backward of the same causal LM at the same batch shape (2 x batch sequences of the
   mean length), in fp32 and bf16; each trainer's share = FLOPs per pair x pairs/s / the best
   ceiling, with FLOPs per pair = 2 sequences x (6 + 2) x matmul params x tokens per sequence
   (the policy's forward+backward and the reference's forward of prompt + chosen and prompt +
   rejected: the work of the two-sequence method, which alignloop's packing, computing each
   prompt once, does less of);
3. trains with alignloop (`alignloop.dpo.train_dpo`, precision chosen by its probe, reference
   log-probs computed once before the first step; held-out accuracy after the last step, outside
   the timing);
4. trains with TRL 1.16 `DPOTrainer` in its own venv (`.venv-trl116`, made by
   `benchmarks/setup_trl116_env.sh`, worker `benchmarks/_trl_dpo_worker.py`), once per setting:
   bf16 off/on x precompute_ref_log_probs on/off, gradient checkpointing off (TRL's DPO default
   is on, which is slower); the fastest setting is TRL's figure. Same batch size, epochs, LR,
   warm-up steps and cosine decay to 10 %, AdamW betas (0.9, 0.95), gradient clipping 1.0, β;
5. prints pairs/s (the reference pass included on both sides), the ratio, the final training
   loss of each (mean of the last 20 steps) and each one's share of the ceiling, and writes
   everything to OUT/dpo_vs_trl.json.

Figures depend on the machine and on what else runs on it: compare the ratio and the shares of
the ceiling, which are measured in the same run, rather than absolute pairs/s across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import ceiling_precisions, lm_matmul_flops, measure_fwd_bwd_flops_per_second  # noqa: E402
from inputs import need  # noqa: E402

from alignloop.device import set_cpu_threads  # noqa: E402
from alignloop.dpo import DPOConfig, train_dpo  # noqa: E402
from alignloop.dpo.train import ranked_pairs  # noqa: E402
from alignloop.jsonl import write_jsonl  # noqa: E402
from alignloop.modeling import count_matmul_params, load_causal_lm, load_tokenizer  # noqa: E402
from alignloop.reward.data import read_preferences  # noqa: E402
from alignloop.reward.train import encode_items, split_by_prompt  # noqa: E402

TRL_VENV = ROOT / ".venv-trl116"
SETUP = ROOT / "benchmarks" / "setup_trl116_env.sh"


def bench_pairs(tokenizer, data: Path, limit: int, max_length: int, held_limit: int = 256):
    """(train ids for TRL, train pairs, held-out pairs): whole prompts held out, pairs that fit max_length."""
    train_items, held_items = split_by_prompt(read_preferences(data).items, 0.1, seed=0)
    out = []
    for items, cap in ((train_items, limit), (held_items, held_limit)):
        kept = []
        for pair in ranked_pairs(items):
            encoded, _ = encode_items(tokenizer, [pair], max_length)  # [] when too long: left out on both sides
            if encoded:
                kept.append((pair, encoded[0]))
            if len(kept) == cap:
                break
        out.append(kept)
    train, held = out
    ids = [{"prompt_ids": e.seqs[0][:e.prompt_len], "chosen_ids": e.seqs[0][e.prompt_len:],
            "rejected_ids": e.seqs[1][e.prompt_len:]} for _, e in train]
    return ids, [p for p, _ in train], [p for p, _ in held]


def pair_rows(pairs) -> list[dict]:
    return [{"prompt": p.prompt, "chosen": p.responses[0], "rejected": p.responses[1]} for p in pairs]


def ensure_trl_venv(venv: Path) -> None:
    if (venv / ".installed").is_file():
        return
    if not SETUP.is_file():
        sys.exit(f"dpo_vs_trl.py: no TRL 1.16 environment at {venv} and no {SETUP} to make it")
    subprocess.run(["bash", str(SETUP), str(venv)], check=True)


def run_trl(venv: Path, spec: dict, out: Path) -> dict:
    tag = (f"bf16{int(spec['bf16'])}_pre{int(spec['precompute_ref_log_probs'])}"
           f"_gc{int(spec['gradient_checkpointing'])}_{spec['attn_implementation']}")
    spec_path, result_path = out / f"trl_spec_{tag}.json", out / f"trl_result_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    proc = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "benchmarks" / "_trl_dpo_worker.py"),
                           str(spec_path), str(result_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker ({tag}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/demo/preferences.jsonl")
    parser.add_argument("--pairs", type=int, default=1000, help="training pairs (the first N)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=DPOConfig.lr)
    parser.add_argument("--beta", type=float, default=DPOConfig.beta)
    parser.add_argument("--loss", default="dpo", choices=["dpo", "ipo"])
    parser.add_argument("--warmup", type=float, default=DPOConfig.warmup, help="fraction of the steps")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--trl-settings", default="bf16=0:pre=1,bf16=1:pre=1,bf16=0:pre=0,bf16=1:pre=0",
                        help="comma-separated TRL settings to try (keys bf16, pre = precompute_ref_log_probs, and "
                             "optionally gc=1 for gradient checkpointing, attn=eager); the fastest is TRL's figure")
    parser.add_argument("--alignloop-precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--trl-venv", type=Path, default=TRL_VENV)
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/dpo/bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    need(args.model / "config.json", "SFT model", "make demo")
    need(args.data, "preferences", "make demo")
    set_cpu_threads()
    threads = torch.get_num_threads()

    tokenizer = load_tokenizer(args.model)
    train_ids, train_pairs, held_pairs = bench_pairs(tokenizer, args.data, args.pairs, args.max_length)
    tokens_per_seq = statistics.fmean(len(p["prompt_ids"]) + len(p[k]) for p in train_ids
                                      for k in ("chosen_ids", "rejected_ids"))
    prompt_share = statistics.fmean(len(p["prompt_ids"]) for p in train_ids) / tokens_per_seq
    print(f"{len(train_ids)} training pairs, {len(held_pairs)} held-out pairs (alignloop only, untimed), "
          f"{tokens_per_seq:.1f} tokens per sequence ({100 * prompt_share:.0f} % prompt), {threads} threads",
          flush=True)
    (args.out / "pairs_ids.json").write_text(json.dumps(train_ids))
    train_file, held_file = args.out / "train.jsonl", args.out / "held_out.jsonl"
    write_jsonl(train_file, pair_rows(train_pairs))
    write_jsonl(held_file, pair_rows(held_pairs))
    total_steps = math.ceil(len(train_ids) * args.epochs / args.batch_size)
    warmup_steps = max(1, int(args.warmup * total_steps))  # as alignloop's DPO stage counts them

    # -- ceiling: plain forward+backward of the same causal LM at the same batch shape
    probe = load_causal_lm(args.model)
    matmul_params = count_matmul_params(probe)
    t = round(tokens_per_seq)
    flops_per_pair = 2 * (lm_matmul_flops(matmul_params, t, backward=True) + lm_matmul_flops(matmul_params, t, False))
    ceilings = {p: measure_fwd_bwd_flops_per_second(probe, 2 * args.batch_size, t, p, seconds=args.ceiling_seconds)
                for p in ceiling_precisions()}
    best_ceiling = max(c["flops_per_second"] for c in ceilings.values())
    del probe
    print("ceiling: " + ", ".join(f"{p} {c['flops_per_second'] / 1e9:.1f} GFLOP/s" for p, c in ceilings.items())
          + f" -> {best_ceiling / flops_per_pair:.1f} pairs/s", flush=True)

    # -- alignloop
    config = DPOConfig(model=args.model, data=train_file, held_out_data=held_file, out_dir=args.out / "alignloop_dpo",
                       loss=args.loss, beta=args.beta, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       warmup=args.warmup, max_length=args.max_length, eval_every=0, checkpoint_every=0,
                       resume=False, tensorboard=False, precision=args.alignloop_precision)
    summary = train_dpo(config)
    assert summary["data"]["train_pairs"] == len(train_ids) and summary["steps"] == total_steps, summary["data"]
    ours = {"trainer": "alignloop", "precision": summary["precision"], "packed": summary["packed"],
            "pairs": len(train_ids) * args.epochs, "seconds_reference": summary["seconds_reference"],
            "seconds_train": summary["seconds_train"], "pairs_per_second": summary["pairs_per_second"],
            "first_loss": summary["first_train_loss"], "final_loss": summary["final_train_loss"],
            "held_out_reward_accuracy": summary["held_out_reward_accuracy"],
            "padding_fraction": summary["padding_fraction"]}
    print(f"alignloop ({ours['precision']}): {ours['pairs_per_second']:.1f} pairs/s, final loss "
          f"{ours['final_loss']:.4f}, held-out reward accuracy {ours['held_out_reward_accuracy']:.3f}", flush=True)

    # -- TRL, each setting
    trl_settings = [x for x in args.trl_settings.split(",") if x]  # --trl-settings "": alignloop only
    if not trl_settings:
        return
    ensure_trl_venv(args.trl_venv)
    trl_runs = []
    for setting in trl_settings:
        opts = dict(kv.split("=") for kv in setting.split(":"))
        spec = {"model": str(args.model), "data": str(args.out / "pairs_ids.json"), "bf16": opts["bf16"] == "1",
                "precompute_ref_log_probs": opts.get("pre", "1") == "1",
                "gradient_checkpointing": opts.get("gc", "0") == "1",
                "attn_implementation": opts.get("attn", "sdpa"), "reference_batch_size": config.eval_batch_size,
                "loss": args.loss, "beta": args.beta, "batch_size": args.batch_size, "epochs": args.epochs,
                "lr": args.lr, "warmup_steps": warmup_steps, "max_length": args.max_length, "threads": threads,
                "seed": 0, "output_dir": str(args.out / "trl_out")}
        r = run_trl(args.trl_venv, spec, args.out)
        trl_runs.append(r)
        print(f"TRL {r['trl_version']} (bf16={r['bf16']}, precompute_ref_log_probs={r['precompute_ref_log_probs']}, "
              f"gradient_checkpointing={r['gradient_checkpointing']}, {r['attn_implementation']} attention): "
              f"{r['pairs_per_second']:.1f} pairs/s, final loss {r['final_loss']:.4f}", flush=True)
    best_trl = max(trl_runs, key=lambda r: r["pairs_per_second"])

    for r in [ours] + trl_runs:
        r["share_of_ceiling"] = r["pairs_per_second"] * flops_per_pair / best_ceiling
    result = {
        "model": str(args.model), "data": str(args.data), "matmul_params": matmul_params,
        "train_pairs": len(train_ids), "tokens_per_sequence": tokens_per_seq, "prompt_share": prompt_share,
        "steps": total_steps, "warmup_steps": warmup_steps, "batch_size": args.batch_size, "epochs": args.epochs,
        "lr": args.lr, "beta": args.beta, "loss": args.loss, "max_length": args.max_length, "threads": threads,
        "flops_per_pair": flops_per_pair, "ceilings": ceilings, "alignloop": ours, "trl_runs": trl_runs,
        "trl_best": best_trl, "speedup_vs_best_trl": ours["pairs_per_second"] / best_trl["pairs_per_second"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (args.out / "dpo_vs_trl.json").write_text(json.dumps(result, indent=2))

    print("\n| trainer | setting | pairs/s | final loss | share of ceiling |")
    print("|---|---|---|---|---|")
    how = "packed rows, prompt once" if ours["packed"] else "padded rows"
    print(f"| alignloop | {ours['precision']}, {how}, reference precomputed | {ours['pairs_per_second']:.1f} | "
          f"{ours['final_loss']:.4f} | {100 * ours['share_of_ceiling']:.0f} % |")
    for r in trl_runs:
        print(f"| TRL {r['trl_version']} | bf16={r['bf16']}, precompute_ref_log_probs={r['precompute_ref_log_probs']}, "
              f"gradient_checkpointing={r['gradient_checkpointing']}, {r['attn_implementation']} attention | "
              f"{r['pairs_per_second']:.1f} | {r['final_loss']:.4f} | {100 * r['share_of_ceiling']:.0f} % |")
    print(f"\nceiling {best_ceiling / 1e9:.1f} GFLOP/s ({best_ceiling / flops_per_pair:.1f} pairs/s), measured in this "
          f"run; loss {args.loss}, beta {args.beta}, {len(train_ids)} pairs x {args.epochs:g} epoch(s); pairs/s:")
    print(f"alignloop / best TRL = {result['speedup_vs_best_trl']:.2f}x")


if __name__ == "__main__":
    main()
