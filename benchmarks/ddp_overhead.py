"""Data parallel's own cost on one machine: N processes x 1 thread against 1 process x N threads.

The same work either way (the demo's PPO stage, and reward training on the demo's preference
pairs, fp32, no checkpoints), launched as `alignloop ...` with OMP_NUM_THREADS=N and as
`torchrun --nproc_per_node N -m alignloop ...` with OMP_NUM_THREADS=1, N = the cores this process
may use. Each side's figure is the stage's own throughput from its summary (PPO: episodes/s after the
first step; reward: preference items/s over the training loop). The runs alternate, `--repeats`
times each (default once), and the best of each side counts, so a moment of load elsewhere hurts neither.

What the ratio says: below 1, the processes' collectives (the gradient all-reduce each optimiser
step, the gathered experience each PPO step) cost more than one OpenMP team's synchronisation;
above 1, the threads of one process wait on each other more than the processes do. There is no
other peer here: this is alignloop against itself. Ends with `alignloop / best 1-process alignloop = N.NNx`
(the lower of the two stages' ratios). Writes runs/bench/ddp_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from alignloop.distributed import torchrun_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import need  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"
COMMON = {"precision": "fp32", "device": "cpu", "checkpoint_every": 0}


def stage_commands(out: Path, ppo_steps: int, reward_epochs: float) -> dict[str, tuple[list[str], str, str]]:
    """{stage: (alignloop arguments, summary file, throughput key)}."""
    sets = lambda values: [a for k, v in values.items() for a in ("--set", f"{k}={v}")]  # noqa: E731
    return {
        "ppo": (["ppo", "--policy", str(DEMO / "sft"), "--reward-model", str(DEMO / "reward_model"),
                 "--prompts", str(DEMO / "sft" / "train_prompts.jsonl"), "--out-dir", str(out / "ppo"),
                 *sets({**COMMON, "steps": ppo_steps, "tensorboard": False})],
                "ppo_summary.json", "episodes_per_second"),
        "reward": (["reward", "train", "--model", str(DEMO / "sft"), "--data", str(DEMO / "preferences.jsonl"),
                    "--out-dir", str(out / "reward"), *sets({**COMMON, "epochs": reward_epochs})],
                   "reward_summary.json", "items_per_second"),
    }


def run_once(args: list[str], summary: str, key: str, out: Path, processes: int, cores: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    if processes > 1:  # what `--nproc N` runs
        command, env = torchrun_command(processes, args)
    else:
        command, env = [sys.executable, "-m", "alignloop", *args], dict(os.environ)
    env.update(OMP_NUM_THREADS=str(cores // processes), TQDM_DISABLE="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ddp_overhead.py: {' '.join(command[:8])} ... failed:\n{done.stderr[-2000:]}")
    result = json.loads(next(out.rglob(summary)).read_text())
    assert result["world_size"] == processes, result["world_size"]
    return float(result[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ppo-steps", type=int, default=6)
    parser.add_argument("--reward-epochs", type=float, default=0.5)
    a = parser.parse_args()
    for path, what in ((DEMO / "sft" / "config.json", "SFT model"), (DEMO / "reward_model" / "config.json", "reward model"),
                       (DEMO / "preferences.jsonl", "preference pairs")):
        need(path, what, "make demo")
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        sys.exit("ddp_overhead.py: needs at least 2 cores")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ddp_overhead_") as tmp:
        for stage, (args, summary, key) in stage_commands(Path(tmp), a.ppo_steps, a.reward_epochs).items():
            runs: dict[str, list[float]] = {"one_process": [], "processes": []}
            for _ in range(a.repeats):
                runs["one_process"].append(run_once(args, summary, key, Path(tmp) / stage, 1, cores))
                runs["processes"].append(run_once(args, summary, key, Path(tmp) / stage, cores, cores))
            best_one, best_many = max(runs["one_process"]), max(runs["processes"])
            results[stage] = {"unit": key, "runs": runs, "ratio": best_many / best_one}
            print(f"{stage:7s} {key}: 1 process x {cores} threads {best_one:8.2f}   "
                  f"{cores} processes x 1 thread {best_many:8.2f}   ratio {best_many / best_one:.2f}"
                  f"   (all runs: {runs})", flush=True)
    bench = ROOT / "runs" / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    (bench / "ddp_overhead.json").write_text(json.dumps({"cores": cores, "load_average": os.getloadavg(),
                                                         "results": results}, indent=1))
    print(f"alignloop / best 1-process alignloop = {min(r['ratio'] for r in results.values()):.2f}x")


if __name__ == "__main__":
    main()
