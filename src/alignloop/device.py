"""Device and precision: picked per machine by measurement, never assumed.

bf16 autocast makes a small GPT-2 several times faster on a CPU with bf16 units
and many times slower on one without. So we time a short matmul in each dtype
once per process and pick the faster; the user can force either. Whatever the matmul dtype, log-probs, ratios, KL, advantages and
losses are computed in fp32 by the callers (`.float()` before any of them).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import time

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


def set_cpu_threads() -> None:
    """Use every core for intra-op parallelism (torch's default can be fewer in containers).

    An explicit OMP_NUM_THREADS wins: on a shared machine, several processes each
    spinning one thread per core slow each other down many times over.

    The count is set even when torch already has it: torch's CPU kernels add up in another
    order once `set_num_threads` has been called at all, so a stage run in a fresh process and
    the same stage run in one that set its threads before (an earlier stage, a notebook) would
    otherwise differ in the last bits, and a resumed run would not be the uninterrupted one.
    """
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested:
        if not requested.isdigit() or int(requested) < 1:
            return  # not a count: OpenMP's own reading of it stands
        n = int(requested)
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# The user's own malloc settings, which `keep_freed_memory` leaves alone.
MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                      "MALLOC_TOP_PAD_")


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory torch frees for the next tensors, instead of returning it to the OS.

    glibc maps every block above its mmap threshold (32 MB at most, whatever one sets) fresh from
    the kernel and unmaps it when freed, so each large temporary of a training step (a batch of
    full-vocabulary logits, an embedding's gradient, a layer's activations) is zero-filled page
    by page by the kernel again at every step, a cost on the scale of the step's own arithmetic
    on a small CPU. With no mmap and no trimming, a freed block goes back to malloc's heap and
    the next tensors reuse its pages (most of them: an aligned request can find a freed block a
    little too small and extend the heap instead); the peak is unchanged (docs/benchmarks.md,
    "Memory kept by malloc"). What the process holds stays near the stage's peak until the stage
    ends, when `return_freed_memory` hands it back.

    Linux with glibc only, and not where the environment already sets malloc's options or
    `ALIGNLOOP_KEEP_FREED_MEMORY=0`. Returns whether the setting was made.
    """
    if os.environ.get("ALIGNLOOP_KEEP_FREED_MEMORY", "1") == "0" or any(v in os.environ for v in MALLOC_ENVIRONMENT):
        return False
    libc = glibc()
    if libc is None:
        return False
    # Large blocks come from the heap (glibc still maps one that a thread's own arena cannot hold),
    # and the heap is trimmed back only past 2 GB free at its top (mallopt takes a C int).
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> None:
    """Hand the memory a finished stage freed back to the system (glibc only; a no-op elsewhere).

    glibc keeps freed heap memory for reuse; after a reward-model stage on SmolLM2 (states of a
    frozen trunk, many packed batches) that was ~4 GiB resident with no tensor alive, which the next
    stage's own peak then sat on. malloc_trim returns it (measured in docs/real-data.md)."""
    gc.collect()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (whose malloc the two functions above tune), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError outside glibc (musl, macOS)
    except (OSError, AttributeError):
        return None
    return libc


@functools.lru_cache(maxsize=None)
def bf16_speedup(device_type: str, size: int = 512, repeats: int = 8) -> float:
    """fp32 time / bf16-autocast time for a (size x size) @ (size x size) matmul chain."""
    if device_type == "cuda":
        return 4.0  # every CUDA device we target has bf16 tensor cores; no need to time it
    a = torch.randn(size, size)
    b = torch.randn(size, size)

    def timed(dtype: torch.dtype | None) -> float:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            for _ in range(2):  # warm-up: first calls pick kernels
                a @ b
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            return time.perf_counter() - start

    try:
        return timed(None) / max(timed(torch.bfloat16), 1e-9)
    except RuntimeError:
        return 0.0  # bf16 not supported at all on this CPU


def choose_precision(device: torch.device, precision: str = "auto") -> str:
    """'fp32' or 'bf16' for matmuls. 'auto' takes bf16 only where it measured >= 1.3x faster."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if precision != "auto":
        return precision
    return "bf16" if bf16_speedup(device.type) >= 1.3 else "fp32"


def autocast(device: torch.device, precision: str):
    """Context for the model's forward passes; a no-op in fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
