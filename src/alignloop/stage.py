"""What every stage shares: the `Stage` shape, the `StageContext`, and `run_stage`.

A stage module (pretrain, sft, sampling, annotate.stage, reward.stage, ppo, evaluate)
defines one object of the `Stage` shape:

    name          'sft'; its summary is `<out_dir>/<name>_summary.json`
    config_class  the stage's validating config dataclass
    outputs(cfg)  every file or directory the stage writes, by role ('model', 'campaign', ...)
    wire(round, user)  the stage's config values in a pipeline round: paths from earlier
                  stages' outputs, with the user's section over them
    run(cfg, ctx) does the work and returns the summary (a JSON-able dict)
    data_parallel (optional, default False) True when `run` trains on its shard of every global
                  batch under torchrun / accelerate launch (pretrain, sft, reward, ppo); under
                  several processes the other stages run on rank 0 alone (`run_on_rank_0`)

`run_stage` is the one way a stage runs, from the CLI, the Python API or the pipeline:
it times the stage, writes the config beside its outputs and the summary last,
atomically, with a fingerprint of the config and of every input it read. The pipeline
reuses a stage whose summary carries the same fingerprint and reruns one whose config
or inputs changed, so a rerun never silently keeps a stale output.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import Checkpointer
from .config import StageConfig
from .device import choose_precision, keep_freed_memory, resolve_device, return_freed_memory, set_cpu_threads
from .distributed import SINGLE_PROCESS, Distributed, from_environment
from .errors import ConfigError
from .files import atomic_write_json, path_fingerprint, read_json_or_none
from .metrics import MetricsLogger, NoMetrics
from .progress import progress

# Round n's seeds are the section's seed + ROUND_SEED_STRIDE * (n - 1). Sampling draws with
# seed + attempt for up to max_resample + 1 attempts and PPO shifts its seed per rollback, so the
# stride leaves room for both without two rounds ever sharing a stream.
ROUND_SEED_STRIDE = 1000


def log(message: str) -> None:
    print(f"[alignloop] {message}", file=sys.stderr, flush=True)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def peak_memory_gib() -> float | None:
    """This process's peak resident memory so far (Linux and macOS; None elsewhere)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 2)  # bytes on macOS, KiB on Linux


def resident_memory_gib() -> float | None:
    """This process's resident memory now (Linux; None elsewhere): what a finished stage left behind."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return round(int(line.split()[1]) / 2**20, 2) if line else None


@dataclass
class StageContext:
    """Built once per process and handed to every stage, so none re-derives it.

    It sets the CPU threads and, in one process, malloc's keeping of freed memory (device.py),
    resolves each config's device and precision (the bf16 timing probe runs once per process),
    and keeps the time and machine load of every stage run.
    `dist` is the process's place in a data-parallel job (torchrun, accelerate launch; one
    process otherwise): a stage whose `data_parallel` is true trains on its shard of every
    global batch, and rank 0 alone writes (distributed.py).
    """

    timings: list[dict[str, Any]] = field(default_factory=list)
    dist: Distributed = field(default_factory=from_environment)

    def __post_init__(self) -> None:
        set_cpu_threads()
        # Not under several processes: those shard or replicate to save memory, and kept freed
        # memory raised FSDP's peak per process (docs/benchmarks.md, "Memory kept by malloc").
        if self.dist.world_size == 1:
            keep_freed_memory()

    def device_and_precision(self, config: StageConfig) -> tuple[torch.device, str]:
        return self.resolve(getattr(config, "device", "auto"), getattr(config, "precision", "auto"))

    def resolve(self, device: str = "auto", precision: str = "auto") -> tuple[torch.device, str]:
        """The torch device and the matmul precision ('fp32' or 'bf16') for these settings.

        Under several processes each takes its own GPU, and all take rank 0's measured precision:
        timed on a shared machine, the bf16 probe could pick differently in each.
        """
        resolved = self.dist.place(resolve_device(device))
        return resolved, self.dist.broadcast(choose_precision(resolved, precision))

    def progress(self, disable: bool = False, **kwargs):
        return progress(disable=disable or not self.dist.is_main, **kwargs)  # one bar: rank 0's

    def metrics(self, out_dir: Path, tensorboard: bool, resume_step: int = 0) -> MetricsLogger | NoMetrics:
        if not self.dist.is_main:
            return NoMetrics()
        return MetricsLogger(out_dir, tensorboard, resume_step=resume_step)

    log = staticmethod(log)


@dataclass
class RoundState:
    """What a pipeline round knows when it wires a stage: where things go and what came before."""

    out: Path  # the run's directory
    round: int  # 1-based
    sections: dict[str, dict[str, Any]]  # the user's section per stage
    outputs: dict[str, dict[str, Path]]  # the latest outputs of every stage run so far, by stage name
    human: bool = False
    response_tokens: int | None = None  # a budget the user set once (ppo.max_new_tokens) for every stage

    @property
    def dir(self) -> Path:
        return self.out / f"round{self.round}"

    def seed(self, user: dict[str, Any], default: int = 0) -> int:
        """This round's seed: the section's own (the one round 1 uses) + ROUND_SEED_STRIDE per round after it."""
        seed = user.get("seed", default)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be a whole number, got {seed!r}")
        return seed + ROUND_SEED_STRIDE * (self.round - 1)

    def policy_dir(self) -> Path:
        """The supervised policy: the SFT stage's model, or the user's own (a `policy` section)."""
        return self.outputs["sft"]["model"] if "sft" in self.outputs else self.outputs["policy"]["model"]

    def prompts(self, stage: str, role: str) -> Path:
        """The section's own `prompts`, else the SFT stage's prompts of that role."""
        user = self.sections.get(stage, {})
        if "prompts" in user:
            return Path(user["prompts"])
        if "sft" not in self.outputs:
            raise ConfigError(f"{stage}.prompts is needed (no sft section to take prompts from)")
        return self.outputs["sft"][role]

    def response_budget(self, user: dict[str, Any]) -> dict[str, int]:
        """`max_new_tokens` for a generating stage: the user's value for it, else the run's budget."""
        if "max_new_tokens" in user or self.response_tokens is None:
            return {}
        return {"max_new_tokens": self.response_tokens}


def section_number(stage: str, user: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """A number a stage's wiring reads from the user's section before its config checks it."""
    value = user.get(key, default)
    if value is None or (kind is float and isinstance(value, int) and not isinstance(value, bool)):
        return value if value is None else float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{stage}.{key}: expected {'a whole number' if kind is int else 'a number'}, got {value!r}")
    return value


class Stage(Protocol):
    name: str
    config_class: type[StageConfig]

    def outputs(self, config: Any) -> dict[str, Path]: ...

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]: ...

    def run(self, config: Any, ctx: StageContext) -> dict[str, Any]: ...


def stage_checkpointer(config: StageConfig, ctx: StageContext) -> Checkpointer:
    """The stage's mid-run checkpoints: `<out_dir>/checkpoint`, every `config.checkpoint_every` steps.

    Every process reads it on resume; rank 0 alone writes it and says what it did.
    """
    return Checkpointer(Path(config.out_dir) / "checkpoint", config_fingerprint(config),
                        getattr(config, "checkpoint_every", 0), ctx.log if ctx.dist.is_main else _quiet)


def summary_path(stage: Stage, config: StageConfig) -> Path:
    return Path(config.out_dir) / f"{stage.name}_summary.json"


# Where a stage writes (sample's `out`: the deprecated name of its campaign file; the data sources' shared
# `prompts_dir`): not inputs, so not in its fingerprint.
OUTPUT_KEYS = ("out_dir", "out", "prompts_dir")


def config_fingerprint(config: StageConfig) -> str:
    """A hash of the config and of what each input path holds (output directories excluded)."""
    values = config.to_dict()
    inputs = {name: path_fingerprint(value) for name, value in sorted(values.items())
              if name not in OUTPUT_KEYS and isinstance(getattr(config, name), Path)}
    payload = json.dumps({"config": values, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def finished_summary(stage: Stage, config: StageConfig, fingerprint: str) -> dict | None:
    """The summary of an earlier run of this exact config on these exact inputs, or None."""
    summary = read_json_or_none(summary_path(stage, config))
    if isinstance(summary, dict) and summary.get("fingerprint") == fingerprint:
        return summary
    return None


def run_stage(stage: Stage, config: StageConfig, ctx: StageContext | None = None, label: str | None = None,
              reuse: bool = False) -> dict[str, Any]:
    """Run `stage` (or, with `reuse`, take its finished output); write its config and summary.

    With a `label` (the pipeline's "round1/ppo"), the start, the end and any reuse are logged.
    """
    ctx = ctx or StageContext()
    say = ctx.log if label is not None and ctx.dist.is_main else _quiet
    done = summary_path(stage, config)
    fingerprint = config_fingerprint(config)
    if reuse and (summary := finished_summary(stage, config, fingerprint)) is not None:
        say(f"{label}: reusing {done.parent} (took {_seconds(summary.get('seconds'))} when it ran)")
        ctx.timings.append({"stage": label or stage.name, "seconds": summary.get("seconds"), "reused": True})
        return summary
    if reuse and done.is_file():
        say(f"{label}: its config or inputs changed since {done} was written: running it again")
    if ctx.dist.world_size > 1 and not getattr(stage, "data_parallel", False):
        return run_on_rank_0(stage, config, ctx, label, fingerprint)
    before, start = load_average(), time.time()
    say(f"{label}: running (load average {before})")
    summary = stage.run(config, ctx)
    return_freed_memory()
    seconds = time.time() - start
    sharding = {"sharding": "fsdp" if ctx.dist.fsdp is not None else "ddp"} if ctx.dist.world_size > 1 else {}
    summary = {"stage": stage.name, **summary, "world_size": ctx.dist.world_size, **sharding, "seconds": seconds,
               "fingerprint": fingerprint}
    if ctx.dist.is_main:
        config.save(config.out_dir)
        atomic_write_json(done, summary)
    # Every process leaves the stage with rank 0's summary, once rank 0 has written its outputs.
    summary = ctx.dist.broadcast(summary)
    after = load_average()
    say(f"{label}: done in {_seconds(seconds)} (load average {before} -> {after})")
    ctx.timings.append({"stage": label or stage.name, "seconds": round(seconds, 2), "load_before": before,
                        "load_after": after, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "reused": False,
                        "peak_memory_gib_so_far": peak_memory_gib(), "memory_gib_after": resident_memory_gib()})
    return summary


def run_on_rank_0(stage: Stage, config: StageConfig, ctx: StageContext, label: str | None,
                  fingerprint: str) -> dict[str, Any]:
    """A stage that does not train (sampling, annotation, evaluation) under several processes:
    rank 0 runs it as one process would, so an annotation server starts once and every file is
    written once; the others wait for its summary.

    They wait by reading the summary file, not in a collective, which would time out (the process
    group's 30 minutes) while people annotate or a long evaluation runs. If rank 0 fails, the
    launcher stops the others.
    """
    if ctx.dist.is_main:
        log(f"{label or stage.name}: runs on rank 0 alone; the other {ctx.dist.world_size - 1} process(es) wait")
        alone = StageContext(timings=ctx.timings, dist=SINGLE_PROCESS)
        return run_stage(stage, config, alone, label)
    while (summary := finished_summary(stage, config, fingerprint)) is None:
        time.sleep(RANK_0_POLL_SECONDS)
    ctx.timings.append({"stage": label or stage.name, "seconds": summary.get("seconds"), "reused": True})
    return summary


RANK_0_POLL_SECONDS = 0.5


def _quiet(message: str) -> None:
    """What a process other than rank 0 says: nothing (the job's log is rank 0's)."""


def _seconds(s: float | None) -> str:
    return "?" if s is None else f"{s:.1f} s"
