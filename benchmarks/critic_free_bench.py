"""Critic-free throughput, alignloop vs TRL 1.16: what `grpo_vs_trl.py` and `rloo_vs_trl.py` share.

Each script names one `Method` (which TRL trainer and worker, which alignloop `algorithm` and the
keys that make its choices TRL's) and calls `main`. For that method it
1. takes the demo's SFT model (policy and reference), its reward model (the reward function, with
   its normalisation) and the first `--num-prompts` of its training prompts; both trainers get the
   same prompt tokens;
2. measures the machine's ceiling (benchmarks/ceiling.py: matmul FLOP/s of a plain forward+backward
   of the policy at the batch shape, fp32 and bf16 autocast, before and after the trainers; the
   better measurement counts);
3. for each beta (`--betas`, default 0.05 and 0: TRL's default for GRPO is 0, which loads no
   reference model; RLOO's is 0.05) runs TRL in its own virtualenv (.venv-trl116, made by
   setup_trl116_env.sh) with bf16=False and bf16=True, then alignloop's PPO stage with the method's
   `algorithm`, in the same settings: 8 completions per step (2 prompts x 4), 48 new tokens,
   temperature 1.0, one optimisation pass per batch, lr 3e-6 (as ppo_vs_trl.py), the same warm-up
   and timed steps;
4. prints episodes/s (completions per second, steady state), alignloop / best TRL at each beta
   (best over bf16 on and off), the final mean reward (normalised RM score, mean over the last
   batches, ± its standard error) and each row's share of the ceiling, and writes
   runs/bench/<method>_vs_trl.json and a markdown table beside it. The last line is `alignloop / best TRL = N.NNx`: the lowest of the
   per-beta ratios, so it holds at every beta compared.

The figures come from whatever machine runs this; ours is a 2-core CPU shared with other jobs,
so expect run-to-run noise of 10-20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignloop.device import set_cpu_threads
from alignloop.files import atomic_write_json, atomic_write_text
from alignloop.jsonl import write_jsonl
from alignloop.modeling import count_matmul_params, load_tokenizer
from alignloop.prompts import encode_prompt, read_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import lm_matmul_flops  # noqa: E402
from inputs import need  # noqa: E402
from ppo_vs_trl import cpu_bf16_flags, cpu_model, fmt_split, measure_ceilings, timed_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-trl116"
DEMO = ROOT / "runs" / "demo"


@dataclass(frozen=True)
class Settings:
    """What both trainers are given. Names follow alignloop's PPOConfig."""

    batch_size: int = 8  # completions per step
    samples_per_prompt: int = 4  # the group: batch_size / samples_per_prompt = 2 prompts per step
    max_new_tokens: int = 48
    temperature: float = 1.0
    lr: float = 3e-6
    cliprange: float = 0.2
    # None: the policy is paid the RM's score alone, as a TRL reward function returns it.
    missing_eos_penalty: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """One critic-free method on both sides."""

    name: str  # alignloop's `algorithm`
    title: str
    trl_trainer: str
    trl_worker: str  # file in benchmarks/
    trl_default_beta: float
    # PPOConfig keys that put beta where TRL puts it: {"kl_loss_coef": beta} (GRPO) or {"kl_coef": beta} (RLOO)
    beta_key: str
    # PPOConfig keys that make alignloop's other choices TRL's (the worker's docstring lists TRL's)
    alignloop_keys: dict = field(default_factory=dict)

    def alignloop_config(self, beta: float) -> dict:
        kl = {"kl_coef": 0.0, "kl_loss_coef": 0.0}
        kl[self.beta_key] = beta
        return {"algorithm": self.name, **kl, **self.alignloop_keys}


# ---------------------------------------------------------------- FLOPs

def critic_free_flops_per_episode(n_policy: int, n_reward: int, prompt_tokens: float, response_tokens: int,
                                  with_reference: bool) -> dict:
    """Matmul FLOPs one episode needs, counted the same way for both trainers.

    generation: one policy forward per token with a KV cache (prompt prefill + response);
    scoring: the reward model's forward, and the reference's where beta > 0 (none otherwise:
    TRL loads no reference at beta 0); update: one forward+backward of the policy (one
    optimisation pass, so the old log-probs equal the new ones and need no forward of their
    own: TRL's RLOO runs one anyway, which this lower bound does not count). The full
    response length is counted (what both pad to when a sample misses EOS).
    """
    t = prompt_tokens + response_tokens
    parts = {
        "generation": lm_matmul_flops(n_policy, t, backward=False),
        "scoring": lm_matmul_flops(n_reward + (n_policy if with_reference else 0), t, backward=False),
        "update": lm_matmul_flops(n_policy, t, backward=True),
    }
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------- the two trainers

def run_trl(method: Method, inputs: dict, settings: Settings, beta: float, bf16: bool, steps: int, warmup: int,
            final_steps: int, work: Path, attention: str = "sdpa") -> dict:
    subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_trl116_env.sh"), str(TRL_VENV)], check=True)
    tag = f"trl-beta{beta:g}-{'bf16' if bf16 else 'fp32'}" + ("" if attention == "sdpa" else f"-{attention}")
    spec = {
        **asdict(settings), "policy": inputs["policy"], "reward_model": inputs["reward_model"],
        "prompts": inputs["prompts"], "prompt_ids": inputs["prompt_ids"], "beta": beta, "bf16": bf16,
        "attn_implementation": attention,
        "steps": steps, "warmup_steps": warmup, "final_score_steps": final_steps,
        "threads": torch.get_num_threads(), "output_dir": str(work / tag),
    }
    spec_path, result_path = work / f"{tag}-spec.json", work / f"{tag}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(TRL_VENV / "bin" / "python"), str(ROOT / "benchmarks" / method.trl_worker),
                           str(spec_path), str(result_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker ({method.trl_worker}, {tag}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def alignloop_config(method: Method, inputs: dict, settings: Settings, beta: float, precision: str, steps: int,
                     out_dir: Path):
    """The PPO stage's config for `method` in the benchmark's settings: TRL's choices, `steps` steps in all."""
    from alignloop.ppo import PPOConfig

    return PPOConfig(
        policy=Path(inputs["policy"]), reward_model=Path(inputs["reward_model"]), prompts=inputs["prompts_file"],
        out_dir=out_dir, steps=steps, batch_size=settings.batch_size, samples_per_prompt=settings.samples_per_prompt,
        mini_batch_size=settings.batch_size, ppo_epochs=1,  # one optimisation pass per batch, as TRL's num_iterations=1
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, cliprange=settings.cliprange,
        target_kl=None,  # a fixed beta, as TRL's
        missing_eos_penalty=settings.missing_eos_penalty,
        reward_clip=None,  # TRL clips no reward by default
        lr=settings.lr, precision=precision, seed=settings.seed,
        # A policy's EOS rate over 8 samples is noise: the EOS-collapse guard could stop a run TRL
        # (which has no such guard) would finish. The other guards (NaN, KL, ratio) stay on.
        min_eos_rate=0.0,
        # TRL runs with save_strategy="no": no checkpoint inside the timed steps on either side
        # (alignloop's start and end checkpoints fall outside them).
        checkpoint_every=0,
        **method.alignloop_config(beta),
    )


def run_alignloop(method: Method, inputs: dict, settings: Settings, beta: float, precision: str, steps: int,
                  warmup: int, final_steps: int, work: Path) -> dict:
    """alignloop's PPO stage with `algorithm: <method>`, timed as the TRL worker times TRL: a stamp after every step.

    The span from the end of the warm-up steps to the end of the last step includes everything
    the trainer does between steps (logging, TensorBoard, sample tables), as TRL's does.
    """
    out_dir = work / f"alignloop-beta{beta:g}-{precision}"
    shutil.rmtree(out_dir, ignore_errors=True)  # never resume a previous benchmark run
    config = alignloop_config(method, inputs, settings, beta, precision, warmup + steps, out_dir)
    timed, _ = timed_steps(config, warmup, steps, settings.batch_size, final_steps)
    return {**timed, "config": method.alignloop_config(beta)}


# ---------------------------------------------------------------- report

def batch_mean_se(batch_means: list[float]) -> float | None:
    """Standard error of the mean of per-batch mean scores (None for one batch).

    Per batch, not per episode: a batch's 8 scores come from 2 prompts, so they are far from
    independent (the prompt moves the score more than the sample does).
    """
    k = len(batch_means)
    if k < 2:
        return None
    mean = sum(batch_means) / k
    return (sum((x - mean) ** 2 for x in batch_means) / (k - 1) / k) ** 0.5


def fmt_reward(row: dict) -> str:
    se = row.get("final_score_se")
    return f"{row['final_score_mean']:+.3f}" + (f" ± {se:.2f}" if se is not None else "")


def fmt_table(method: Method, report: dict) -> str:
    lines = ["| beta | trainer | precision | episodes/s | vs best TRL | final reward ± SE | share of ceiling | ceiling ep/s "
             "| time: generation / scoring / update (+other) | load avg |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|---|"]
    for b in report["by_beta"]:
        best = b.get("trl_best_eps")
        for row in b["rows"]:
            ratio = f"{row['episodes_per_second'] / best:.2f}x" if best else "-"
            lines.append(f"| {b['beta']:g} | {row['trainer']} | {row['precision']} | {row['episodes_per_second']:.2f} "
                         f"| {ratio} | {fmt_reward(row)} | {100 * row['share_of_ceiling']:.0f} % "
                         f"| {b['ceiling_episodes_per_second']:.1f} | {fmt_split(row.get('time_split_seconds'))} | "
                         + "→".join(f"{x:.1f}" for x in row.get("load_average_1min", [])) + " |")
    return "\n".join(lines)


def parse_betas(text: str) -> list[float]:
    betas = [float(b) for b in text.split(",") if b.strip()]
    if not betas or any(b < 0 for b in betas):
        raise argparse.ArgumentTypeError(f"expected comma-separated betas >= 0, got '{text}'")
    return betas


def load_inputs(sft: Path, reward_model: Path, prompts_file: Path, num_prompts: int, work: Path) -> dict:
    """The directories both sides load and the prompts both sample from, as text and as alignloop's tokens."""
    need(sft / "config.json", "SFT model", "make demo")
    need(reward_model / "config.json", "reward model", "make demo")
    need(prompts_file, "training prompts", "make demo")
    tokenizer = load_tokenizer(sft)
    prompts = read_prompts(prompts_file, limit=num_prompts)
    work.mkdir(parents=True, exist_ok=True)
    subset = work / "prompts.jsonl"  # the same prompts for alignloop as for TRL
    write_jsonl(subset, ({"prompt": p} for p in prompts))
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    return {"policy": str(sft), "reward_model": str(reward_model), "prompts": prompts, "prompt_ids": prompt_ids,
            "prompts_file": subset, "mean_prompt_tokens": sum(map(len, prompt_ids)) / len(prompt_ids)}


def main(method: Method, argv: list[str] | None = None) -> int:
    script = f"benchmarks/{method.name}_vs_trl.py"
    parser = argparse.ArgumentParser(prog=script, description=f"{method.title} throughput: alignloop vs TRL 1.16's "
                                     f"{method.trl_trainer}, on the demo's models and prompts.")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per trainer")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps run first and excluded from timing")
    parser.add_argument("--final-steps", type=int, default=6,
                        help="final reward = mean RM score of the last N batches (2 prompts each)")
    parser.add_argument("--betas", type=parse_betas, default=[0.05, 0.0],
                        help=f"comma-separated KL coefficients, each run on both sides (TRL's default for "
                             f"{method.trl_trainer}: {method.trl_default_beta:g})")
    parser.add_argument("--trl-precision", default="both", choices=["both", "fp32", "bf16"])
    parser.add_argument("--trl-attention", default="sdpa",
                        help="comma-separated HF attention implementations to run TRL with (sdpa, eager); "
                             "each with every --trl-precision")
    parser.add_argument("--alignloop-precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-alignloop", action="store_true")
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--sft", type=Path, default=DEMO / "sft", help="the policy and reference")
    parser.add_argument("--reward-model", type=Path, default=DEMO / "reward_model")
    parser.add_argument("--prompts", type=Path, default=None, help="default: SFT_DIR/train_prompts.jsonl")
    parser.add_argument("--num-prompts", type=int, default=256, help="the first N distinct prompts")
    parser.add_argument("--ceiling-seconds", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / f"{method.name}_vs_trl.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or not 1 <= args.final_steps <= args.warmup_steps + args.steps:
        parser.error("need --steps >= 1, --warmup-steps >= 0 and 1 <= --final-steps <= warm-up + timed steps")

    set_cpu_threads()
    settings = Settings(lr=args.lr)
    work = args.out.parent / "work" / method.name
    inputs = load_inputs(args.sft, args.reward_model, args.prompts or args.sft / "train_prompts.jsonl",
                         args.num_prompts, work)
    from transformers import AutoModelForSequenceClassification

    from alignloop.modeling import load_causal_lm

    n_pol = count_matmul_params(load_causal_lm(inputs["policy"]))
    n_rm = count_matmul_params(AutoModelForSequenceClassification.from_pretrained(inputs["reward_model"]))
    seq_len = round(inputs["mean_prompt_tokens"]) + settings.max_new_tokens
    print(f"[{method.name}] policy {inputs['policy']}, reward model {inputs['reward_model']}; "
          f"{len(inputs['prompts'])} prompts, mean {inputs['mean_prompt_tokens']:.1f} tokens", flush=True)
    ceilings_before = measure_ceilings(inputs["policy"], settings.batch_size, seq_len, args.ceiling_seconds)
    print(f"[{method.name}] ceiling before: " + ", ".join(f"{p} {c['flops_per_second'] / 1e9:.1f} GFLOP/s"
                                                         for p, c in ceilings_before.items()), flush=True)
    trl_precisions = ["fp32", "bf16"] if args.trl_precision == "both" else [args.trl_precision]
    by_beta = []
    for beta in args.betas:
        rows = []
        if not args.skip_trl:
            for p, attention in [(p, a) for a in args.trl_attention.split(",") for p in trl_precisions]:
                t0, load0 = time.time(), os.getloadavg()[0]
                r = run_trl(method, inputs, settings, beta, p == "bf16", args.steps, args.warmup_steps,
                            args.final_steps, work, attention)
                if attention != "sdpa":
                    p = f"{p}, {attention} attention"
                rows.append({"trainer": f"TRL {r['trl_version']} {r['trainer']}", "precision": p,
                             "final_score_se": batch_mean_se(r["score_per_step"][-args.final_steps:]), **{
                    k: r[k] for k in ("episodes_per_second", "final_score_mean", "seconds_timed", "steps_timed",
                                      "warmup_steps_excluded", "time_split_seconds")},
                    "load_average_1min": [load0, os.getloadavg()[0]], "detail": r})
                print(f"[{method.name}] beta {beta:g} TRL {p}: {r['episodes_per_second']:.2f} episodes/s, final reward "
                      f"{fmt_reward(rows[-1])} ({time.time() - t0:.0f} s)", flush=True)
        if not args.skip_alignloop:
            t0, load0 = time.time(), os.getloadavg()[0]
            a = run_alignloop(method, inputs, settings, beta, args.alignloop_precision, args.steps,
                              args.warmup_steps, args.final_steps, work)
            rows.append({"trainer": "alignloop", "final_score_se": batch_mean_se(a["score_per_step"][-args.final_steps:]),
                         **{k: a[k] for k in (
                "precision", "episodes_per_second", "final_score_mean", "seconds_timed", "steps_timed",
                "warmup_steps_excluded", "time_split_seconds")},
                "load_average_1min": [load0, os.getloadavg()[0]], "detail": a})
            print(f"[{method.name}] beta {beta:g} alignloop {a['precision']}: {a['episodes_per_second']:.2f} episodes/s, "
                  f"final reward {fmt_reward(rows[-1])} ({time.time() - t0:.0f} s)", flush=True)
        flops = critic_free_flops_per_episode(n_pol, n_rm, inputs["mean_prompt_tokens"], settings.max_new_tokens,
                                              with_reference=beta > 0)
        trl_rows = [r for r in rows if r["trainer"].startswith("TRL")]
        entry = {"beta": beta, "flops_per_episode": flops, "rows": rows,
                 "trl_best_eps": max((r["episodes_per_second"] for r in trl_rows), default=None)}
        al = [r for r in rows if r["trainer"] == "alignloop"]
        if al and entry["trl_best_eps"]:
            entry["ratio_alignloop_over_best_trl"] = al[0]["episodes_per_second"] / entry["trl_best_eps"]
        by_beta.append(entry)

    # Measured again after the trainers; the better of the two counts, so a load spike during one
    # of them cannot make the ceiling look low (and every share look high).
    ceilings_after = measure_ceilings(inputs["policy"], settings.batch_size, seq_len, args.ceiling_seconds)
    ceilings = {p: max(ceilings_before[p], ceilings_after[p], key=lambda c: c["flops_per_second"])
                for p in ceilings_before}
    best_ceiling = max(c["flops_per_second"] for c in ceilings.values())
    print(f"[{method.name}] ceiling after: " + ", ".join(f"{p} {c['flops_per_second'] / 1e9:.1f} GFLOP/s"
                                                        for p, c in ceilings_after.items())
          + f"; best {best_ceiling / 1e9:.1f} GFLOP/s", flush=True)
    for entry in by_beta:
        entry["ceiling_episodes_per_second"] = best_ceiling / entry["flops_per_episode"]["total"]
        for row in entry["rows"]:
            row["share_of_ceiling"] = row["episodes_per_second"] * entry["flops_per_episode"]["total"] / best_ceiling

    ratios = [b["ratio_alignloop_over_best_trl"] for b in by_beta if "ratio_alignloop_over_best_trl" in b]
    report = {
        "command": f".venv/bin/python {script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "method": asdict(method), "settings": asdict(settings), "betas": args.betas, "steps_timed": args.steps,
        "warmup_steps": args.warmup_steps, "final_score_steps": args.final_steps,
        "models": {"policy": inputs["policy"], "reward_model": inputs["reward_model"]},
        "prompts": len(inputs["prompts"]), "mean_prompt_tokens": inputs["mean_prompt_tokens"],
        "matmul_params": {"policy": n_pol, "reward_model": n_rm},
        "machine": {"cpu": cpu_model(), "bf16_flags": cpu_bf16_flags(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "note": "shared with other jobs: figures vary run to run"},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ceiling": ceilings, "ceiling_before": ceilings_before, "ceiling_after": ceilings_after,
        "ceiling_flops_per_second": best_ceiling,
        "by_beta": by_beta,
        # the headline: the lowest per-beta ratio, so it holds at every beta compared
        "ratio_alignloop_over_best_trl": min(ratios) if ratios else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    table = fmt_table(method, report)
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    print()
    print(table)
    print(f"\nwritten: {args.out} and {args.out.with_suffix('.md')}")
    for b in by_beta:
        if "ratio_alignloop_over_best_trl" in b:
            print(f"beta {b['beta']:g}: alignloop / best TRL = {b['ratio_alignloop_over_best_trl']:.2f}x")
    if ratios:
        print(f"alignloop / best TRL = {min(ratios):.2f}x")
    return 0
