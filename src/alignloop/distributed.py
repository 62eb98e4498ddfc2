"""Data parallel training over torch.distributed: N processes, each on its shard of every global batch.

A launcher starts the processes and tells each its place in the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    torchrun --nproc_per_node N -m alignloop sft ...
    accelerate launch --config_file examples/accelerate/ddp_gpu.yaml -m alignloop sft ...

The first `StageContext` of each process joins the job's process group (`from_environment`): gloo
for CPU tensors, NCCL for CUDA ones. A process started by no launcher is `SINGLE_PROCESS`, on which
every collective here is the identity, so a one-process run computes exactly what it did before
data parallelism existed.

What keeps a run the same whatever N is (docs/scale.md):
- every process draws the same global batch the one-process run draws, from the same seed, and
  takes its contiguous block of rows (`Distributed.shard`);
- each process divides its loss sum by the GLOBAL batch's token or item count, which it counts
  itself from the global batch, so its gradient is its share of the global mean's;
- DistributedDataParallel averages the gradients over the processes, so each share is scaled by
  N before its backward (`Distributed.backward`): the average is then the sum of the shares, the
  global mean's gradient, and every process steps the same optimiser on it;
- the numbers a loop logs or tests (loss, accuracy, token counts) are summed over processes, so
  every process sees the same values and its guards (non-finite loss) decide the same way.
Only the order of the floating-point sums changes with N (a matmul over 16 rows vs two over 8, one
all-reduce); with N a power of two the scaling by N and DDP's division by N are exact.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .checkpoint import rng_state, set_rng_state
from .errors import ConfigError
from .fsdp import FSDPSettings, settings_from_environment

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel job: rank `rank` of `world_size` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank on this machine: which GPU the process uses
    fsdp: FSDPSettings | None = None  # set: a trained model is sharded over the processes (fsdp.py), not replicated

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes models, checkpoints, metrics and summaries."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This process's rows of a global batch of `n`: contiguous, sizes differing by at most one
        (10 rows over 3 processes: 0-3, 4-6, 7-9); empty when n < world_size and rank >= n."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def place(self, device: torch.device) -> torch.device:
        """The device this process computes on: under several processes, plain `cuda` is its own GPU."""
        if self.world_size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (float64); the values themselves in one process."""
        if self.world_size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)  # on the CPU: gloo carries it
        dist.all_reduce(total)
        return total.tolist()

    def all_gather(self, value: T) -> list[T]:
        """Every process's `value` (any picklable object), in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` in every process (what the others pass is ignored)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_max(self, value: float) -> float:
        """The largest of the processes' `value`s."""
        return value if self.world_size == 1 else max(self.all_gather(value))

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's `rows` (its shard of a batch, same shape past dim 0), joined in rank order."""
        if self.world_size == 1:
            return rows
        return torch.cat([r.to(rows.device) for r in self.all_gather(rows.cpu())])

    def all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum each parameter's gradient over the processes, in place.

        For a loop whose backward passes do not all go through one DDP module (PPO: policy,
        value head or critic, the rollout's forwards reused by the update, critic warm-up with the
        policy out of the loss): each process's gradient is its share of the global mean, so the
        sum is the global gradient. One coalesced all-reduce per dtype and device, as DDP's buckets.
        Every process must hold gradients for the same parameters (it runs the same losses on rows
        of its own); those without one are left out, as the optimiser leaves them.
        """
        if self.world_size == 1:
            return
        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is not None:
                groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for group in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
                offset += p.grad.numel()

    def backward(self, share: torch.Tensor) -> None:
        """Backward of this process's share of a global loss (its rows' part of the global mean).

        DDP averages gradients over the processes; scaled by N, the shares average to their sum.
        (A micro-batch's backward adds to gradients that DDP already averaged, which are the same
        in every process, so the average keeps them too: gradient accumulation stays exact.)
        """
        (share * self.world_size if self.world_size > 1 else share).backward()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` for training: in DistributedDataParallel under several processes (see `backward`).

        Call it after the optimiser set-up (`training.model_optimizer`), whose bf16 weights DDP's
        gradient buckets must be built for. Every forward that trains must go through the wrapper.
        """
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        # No buffers to broadcast before each forward: none of the models trained here changes its
        # buffers. (torch 2.13 renamed the switch; torch >= 2.4 is supported.)
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       **no_buffer_sync)

    def rng_states(self, generator: torch.Generator | None = None) -> list[dict[str, Any]]:
        """Every process's RNG state (and `generator`'s), in rank order, for a checkpoint (every process must call it)."""
        return self.all_gather(rng_state(generator))

    def restore_rng_state(self, saved: list[dict[str, Any]] | dict[str, Any], log=lambda message: None,
                          generator: torch.Generator | None = None) -> None:
        """Set this process's RNG state from a checkpoint's `rng_states()` (or one state, from one process)."""
        states = saved if isinstance(saved, list) else [saved]
        if len(states) != self.world_size:
            log(f"the checkpoint was written by {len(states)} process(es), resumed by {self.world_size}: "
                f"random draws (dropout) differ from the uninterrupted run's")
        set_rng_state(states[self.rank % len(states)], generator)


SINGLE_PROCESS = Distributed()

ACCELERATE_CPU_HINT = ("accelerate launch --cpu with --num_processes > 1 starts ONE process (accelerate's CPU "
                       "launcher needs mpirun): launch N CPU processes with `torchrun --nproc_per_node N -m alignloop "
                       "...` or `accelerate launch --config_file examples/accelerate/ddp_cpu.yaml -m alignloop ...`")


def torchrun_command(nproc: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run `alignloop <args>` on `nproc` processes of this machine
    (what `--nproc N` does): torchrun, with the cores shared out unless OMP_NUM_THREADS is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > cores:  # each process needs a core of its own; more only thrash (and each loads every model)
        raise ConfigError(f"--nproc {nproc} is more processes than the {cores} core(s) this process may use")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // nproc))}
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
             "-m", "alignloop", *args], env)


DEEPSPEED_HINT = ("accelerate launched alignloop with DeepSpeed: alignloop shards with FSDP2 "
                  "(examples/accelerate/fsdp.yaml) or trains full copies (DDP), so that config's ZeRO stage would be "
                  "ignored (docs/scale.md)")


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_job() -> None:
    """A process's command ended well: wait for the others, then leave the process group.

    Without the barrier a process can close its connections while another still exchanges
    with it (a last gather of the saved weights), and gloo aborts that other one at exit.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        leave_process_group()


@functools.cache
def from_environment() -> Distributed:
    """This process's place in the job that torchrun or accelerate launch started (joining its
    process group on the first call), or `SINGLE_PROCESS` when no launcher started several."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1"):
        # Training on with DDP's full copies would ignore the memory plan the user asked for.
        raise ConfigError(DEEPSPEED_HINT)
    fsdp = settings_from_environment(os.environ)
    if fsdp is not None:
        # accelerate's default asks transformers to load real weights in rank 0 only (the others get
        # empty ones, for FSDP1 to fill by a broadcast). alignloop loads the whole model in every process
        # (each probes and caches with it before training) and then shards it: every load must be real.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        # accelerate's CPU launcher runs the command once, with MASTER_ADDR set for the N processes
        # it would need mpirun to start: training on as one process would silently be 1/N of the job.
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_ADDR" in os.environ:
            raise ConfigError(ACCELERATE_CPU_HINT)
        return SINGLE_PROCESS
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"  # a stage on device=cpu still runs on a GPU machine
        else:
            backend = "gloo"
        dist.init_process_group(backend)
        atexit.register(leave_process_group)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, fsdp=fsdp)
