"""Device and precision: picked per machine by measurement, never assumed.

bf16 autocast makes a small GPT-2 several times faster on a CPU with bf16 units
and many times slower on one without. So we time a short matmul in each dtype
once per process and pick the faster; the user can force either. Whatever the matmul dtype, log-probs, ratios, KL, advantages and
losses are computed in fp32 by the callers (`.float()` before any of them).
"""

from __future__ import annotations

import contextlib
import functools
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
