"""Reward-model training, alignloop vs TRL's RewardTrainer: same backbone, same pairs, same settings, one run.

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/reward_vs_trl.py \
        [--model runs/demo/sft] [--data runs/reward/data] [--pairs 1000] [--batch-size 32]

1. reads the pairs (`benchmarks/reward_data.py` makes them: SFT samples labelled by VADER
   sentiment with 10 % label noise) and tokenizes them once with alignloop's prompt formatting,
   so both trainers see identical token sequences (prompt + response + EOS);
2. trains with alignloop (`alignloop.reward.train_reward_model`, precision chosen by its probe);
3. trains with TRL 0.23 `RewardTrainer` in its own venv (`benchmarks/setup_trl_env.sh`, worker
   `benchmarks/_trl_reward_worker.py`), once per setting: bf16 off/on x group_by_length off/on;
   the fastest setting is TRL's figure (same batch size, max length, epochs, LR schedule shape);
4. measures the machine's ceiling (`benchmarks/ceiling.py`): matmul FLOP/s of a plain forward+backward
   of the same sequence classifier at the same batch shape (2 x batch sequences of the mean length),
   in fp32 and bf16; each trainer's share = FLOPs per pair x pairs/s / the best ceiling, with
   FLOPs per pair = 2 sequences x 6 x matmul params x tokens per sequence (real tokens, no padding);
5. prints pairs/s, the ratio, both held-out accuracies (same held-out token ids on both sides) and
   writes everything to OUT/reward_vs_trl.json.

Figures depend on the machine and on what else runs on it: compare the ratio and the shares of
the ceiling, which are measured in the same run, rather than absolute pairs/s across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import ceiling_precisions, lm_matmul_flops, measure_fwd_bwd_flops_per_second  # noqa: E402
from inputs import ensure_reward_data, need  # noqa: E402

from alignloop.device import set_cpu_threads  # noqa: E402
from alignloop.jsonl import write_jsonl  # noqa: E402
from alignloop.modeling import count_matmul_params, load_tokenizer  # noqa: E402
from alignloop.reward.data import read_preferences  # noqa: E402
from alignloop.reward.model import init_reward_model  # noqa: E402
from alignloop.reward.train import RewardTrainConfig, encode_items, train_reward_model  # noqa: E402

TRL_VENV = ROOT / ".venv-trl"


def pair_ids(tokenizer, path: Path, limit: int | None, max_length: int) -> tuple[list[dict], list]:
    """Token ids of (chosen, rejected) for the first `limit` usable pairs, and the items themselves."""
    items = [it for it in read_preferences(path).items if len(it.responses) == 2][:limit]
    ids, keep = [], []
    for it in items:
        encoded, _ = encode_items(tokenizer, [it], max_length)  # [] when too long, as both trainers drop it
        if encoded:
            ids.append({"chosen": encoded[0].seqs[0], "rejected": encoded[0].seqs[1]})
            keep.append(it)
    return ids, keep


def run_trl(spec: dict, out: Path) -> dict:
    attention = "" if spec["attn_implementation"] == "sdpa" else f"_{spec['attn_implementation']}"
    spec_path = out / f"trl_spec_bf16{int(spec['bf16'])}_gbl{int(spec['group_by_length'])}{attention}.json"
    result_path = spec_path.with_name(spec_path.name.replace("spec", "result"))
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([str(TRL_VENV / "bin" / "python"), str(ROOT / "benchmarks" / "_trl_reward_worker.py"),
                           str(spec_path), str(result_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs/demo/sft")
    parser.add_argument("--data", type=Path, default=ROOT / "runs/reward/data", help="train.jsonl + held_out.jsonl")
    parser.add_argument("--pairs", type=int, default=1000, help="training pairs (the first N of train.jsonl)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--trl-settings", default="bf16=0:gbl=0,bf16=1:gbl=0,bf16=0:gbl=1,bf16=1:gbl=1",
                        help="comma-separated TRL settings to try (keys bf16, gbl, and optionally attn=eager); "
                             "the fastest is TRL's figure")
    parser.add_argument("--pack-width", type=int, default=None, help="alignloop's pack_width (default: its config's)")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/reward/bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    need(args.model / "config.json", "model", "make demo")
    ensure_reward_data(args.model, args.data)
    set_cpu_threads()
    threads = torch.get_num_threads()

    tokenizer = load_tokenizer(args.model)
    train_ids, train_items = pair_ids(tokenizer, args.data / "train.jsonl", args.pairs, args.max_length)
    held_ids, held_items = pair_ids(tokenizer, args.data / "held_out.jsonl", None, args.max_length)
    tokens_per_seq = statistics.fmean(len(s) for p in train_ids for s in (p["chosen"], p["rejected"]))
    print(f"{len(train_ids)} training pairs, {len(held_ids)} held-out pairs, {tokens_per_seq:.1f} tokens per "
          f"sequence, {threads} threads", flush=True)
    (args.out / "pairs_ids.json").write_text(json.dumps({"train": train_ids, "held_out": held_ids}))
    # The same pairs, as text, for alignloop (its reader, tokenizer and length filter give the same ids).
    train_file, held_file = args.out / "train.jsonl", args.out / "held_out.jsonl"
    write_jsonl(train_file, ({"prompt": it.prompt, "chosen": it.responses[0], "rejected": it.responses[1]} for it in train_items))
    write_jsonl(held_file, ({"prompt": it.prompt, "chosen": it.responses[0], "rejected": it.responses[1]} for it in held_items))

    # -- ceiling: plain forward+backward of the same classifier at the same batch shape
    probe = init_reward_model(args.model, tokenizer)
    matmul_params = count_matmul_params(probe)
    flops_per_pair = 2 * lm_matmul_flops(matmul_params, round(tokens_per_seq), backward=True)
    ceilings = {p: measure_fwd_bwd_flops_per_second(probe, 2 * args.batch_size, round(tokens_per_seq), p,
                                                    seconds=args.ceiling_seconds) for p in ceiling_precisions()}
    best_ceiling = max(c["flops_per_second"] for c in ceilings.values())
    del probe
    print("ceiling: " + ", ".join(f"{p} {c['flops_per_second'] / 1e9:.1f} GFLOP/s" for p, c in ceilings.items())
          + f" -> {best_ceiling / flops_per_pair:.1f} pairs/s", flush=True)

    # -- alignloop
    config = RewardTrainConfig(model=args.model, data=train_file, held_out_data=held_file, out_dir=args.out / "alignloop_rm",
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                               normalize_samples=64,
                               **({"pack_width": args.pack_width} if args.pack_width is not None else {}))
    summary = train_reward_model(config)
    ours = {"trainer": "alignloop", "precision": summary["precision"], "pairs": len(train_ids) * args.epochs,
            "train_seconds": summary["train_seconds"], "held_out_accuracy": summary["held_out_accuracy"],
            "padding_fraction": summary["padding_fraction"], "packed": summary["packed"]}
    ours["pairs_per_second"] = ours["pairs"] / ours["train_seconds"]
    print(f"alignloop ({ours['precision']}): {ours['pairs_per_second']:.1f} pairs/s, "
          f"held-out accuracy {ours['held_out_accuracy']:.3f}", flush=True)

    # -- TRL, each setting
    trl_settings = [x for x in args.trl_settings.split(",") if x]  # --trl-settings "": alignloop only
    if not trl_settings:
        return
    subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_trl_env.sh"), str(TRL_VENV)], check=True)
    trl_runs = []
    for setting in trl_settings:
        opts = dict(kv.split("=") for kv in setting.split(":"))
        spec = {"model": str(args.model), "data": str(args.out / "pairs_ids.json"), "bf16": opts["bf16"] == "1",
                "group_by_length": opts["gbl"] == "1", "attn_implementation": opts.get("attn", "sdpa"),
                "batch_size": args.batch_size, "epochs": args.epochs,
                "lr": args.lr, "warmup": config.warmup, "max_length": args.max_length, "threads": threads,
                "seed": 0, "output_dir": str(args.out / "trl_out")}
        r = run_trl(spec, args.out)
        trl_runs.append(r)
        print(f"TRL (bf16={r['bf16']}, group_by_length={r['group_by_length']}, attention {r['attn_implementation']}): "
              f"{r['pairs_per_second']:.1f} pairs/s, "
              f"held-out accuracy {r['held_out_accuracy']:.3f}", flush=True)
    best_trl = max(trl_runs, key=lambda r: r["pairs_per_second"])

    for r in [ours] + trl_runs:
        r["share_of_ceiling"] = r["pairs_per_second"] * flops_per_pair / best_ceiling
    result = {
        "model": str(args.model), "matmul_params": matmul_params, "train_pairs": len(train_ids),
        "held_out_pairs": len(held_ids), "tokens_per_sequence": tokens_per_seq, "batch_size": args.batch_size,
        "epochs": args.epochs, "lr": args.lr, "max_length": args.max_length, "threads": threads,
        "flops_per_pair": flops_per_pair, "ceilings": ceilings, "alignloop": ours, "trl_runs": trl_runs,
        "trl_best": best_trl, "speedup_vs_best_trl": ours["pairs_per_second"] / best_trl["pairs_per_second"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (args.out / "reward_vs_trl.json").write_text(json.dumps(result, indent=2))

    print("\n| trainer | setting | pairs/s | held-out accuracy | share of ceiling |")
    print("|---|---|---|---|---|")
    how = "packed rows" if ours["packed"] else "length buckets, padded"
    print(f"| alignloop | {ours['precision']}, {how}, one forward per batch | {ours['pairs_per_second']:.1f} | "
          f"{ours['held_out_accuracy']:.3f} | {100 * ours['share_of_ceiling']:.0f} % |")
    for r in trl_runs:
        print(f"| TRL {r['trl_version']} | bf16={r['bf16']}, group_by_length={r['group_by_length']}, "
              f"{r['attn_implementation']} attention | "
              f"{r['pairs_per_second']:.1f} | {r['held_out_accuracy']:.3f} | {100 * r['share_of_ceiling']:.0f} % |")
    print(f"\nceiling {best_ceiling / 1e9:.1f} GFLOP/s ({best_ceiling / flops_per_pair:.1f} pairs/s), measured in this "
          f"run; pairs/s:")
    print(f"alignloop / best TRL = {result['speedup_vs_best_trl']:.2f}x")


if __name__ == "__main__":
    main()
