"""The machine's ceiling for a model: FLOP counts and the FLOP/s of a plain forward+backward.

Every benchmark reports its throughput as a share of this ceiling, so a figure
says how much of the hardware a trainer uses, not only how it compares to a peer.

FLOPs are counted from the matmul parameters N (`alignloop.modeling.count_matmul_params`:
every 2-D weight but the input embedding, plus the tied LM head):
2·N per token forward, 6·N per token forward+backward (the backward pass costs
two matmuls per forward matmul: one for the input gradient, one for the weight
gradient). This ignores the attention score matmuls (QKᵀ and A·V: 4·layers·seq·width
per token forward, about 4 % of the 4 × 256 model's FLOPs at 64 tokens, 2 % at 8 × 512), layer norms,
softmaxes, GELUs and the optimizer step: the count is a lower bound, the same one
on both sides of every ratio.

Import from a benchmark script run as `python benchmarks/x.py` with `from ceiling import ...`,
or from the repository root with `from benchmarks.ceiling import ...`.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from transformers import PreTrainedModel

from alignloop.device import autocast


def lm_matmul_flops(matmul_params: int, tokens: int, backward: bool) -> int:
    """FLOPs of the matmuls for `tokens` tokens: 2·N·tokens forward, 6·N·tokens forward+backward."""
    return (6 if backward else 2) * matmul_params * tokens


@functools.lru_cache(maxsize=None)
def ceiling_precisions(device: torch.device | str = "cpu") -> list[str]:
    """The matmul dtypes worth a ceiling measurement on this machine: fp32, and bf16 unless it is far slower.

    On a CPU without bf16 units bf16 autocast runs 25-40x slower than fp32 (2-3 vs 67-86
    GFLOP/s measured here), so its ceiling can never be the best one and measuring it takes
    minutes per model (40 s per forward+backward at 8 x 512). `alignloop.device.bf16_speedup`'s
    short probe decides: below 0.25x fp32, bf16 is skipped and the benchmarks say so.
    """
    from alignloop.device import bf16_speedup

    device = torch.device(device)
    if device.type == "cpu" and bf16_speedup("cpu") < 0.25:
        return ["fp32"]
    return ["fp32", "bf16"]


def measure_fwd_bwd_flops_per_second(model: PreTrainedModel, batch_size: int, seq_len: int, precision: str,
                                     device: torch.device | str = "cpu", seconds: float = 5.0,
                                     warmup: int = 2, min_iters: int = 3) -> dict:
    """Matmul FLOP/s of plain forward+backward passes of `model` on random (batch_size, seq_len) token ids.

    This is the best a trainer can do with this model at this batch shape and dtype on this
    machine: no generation, no Python between kernels, no optimizer. `precision` is "fp32" or
    "bf16" (autocast, as alignloop trains). The loss is the model's own (cross-entropy on
    `labels` for a causal LM, the scalar for a sequence classifier), so the backward pass is
    the one a trainer runs. Gradients are set to None after each pass, as a trainer does.

    FLOP/s are taken from the median pass time. Returns {"flops_per_second", "seconds_per_pass"
    (median), "seconds_per_pass_mean", "iters", "tokens_per_pass", "matmul_params", ...}.
    The model's requires_grad flags, gradients and train/eval mode are restored afterwards.
    """
    from alignloop.modeling import count_matmul_params

    device = torch.device(device)
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    is_lm = model.get_output_embeddings() is not None
    labels = input_ids if is_lm else torch.zeros(batch_size, device=device)

    saved_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.train()  # our models have dropout 0, so train() only changes what autograd keeps
    for p in model.parameters():
        p.requires_grad_(True)

    def one_pass() -> None:
        with autocast(device, precision):
            out = model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits.float()  # losses in fp32, as the trainers compute them
        if is_lm:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1))
        else:
            loss = ((logits.squeeze(-1) - labels) ** 2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        for _ in range(warmup):  # first passes pick kernels and allocate buffers
            one_pass()
        pass_seconds: list[float] = []
        start = time.perf_counter()
        while len(pass_seconds) < min_iters or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            one_pass()
            pass_seconds.append(time.perf_counter() - t0)
    finally:
        for p, flag in zip(model.parameters(), saved_flags):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    n = count_matmul_params(model)
    tokens = batch_size * seq_len
    # The median pass, not the mean: on a machine shared with other jobs a few passes stall,
    # and the ceiling is what the hardware does in an ordinary moment, not in the worst one.
    median = statistics.median(pass_seconds)
    return {
        "flops_per_second": lm_matmul_flops(n, tokens, backward=True) / median,
        "seconds_per_pass": median,
        "seconds_per_pass_mean": sum(pass_seconds) / len(pass_seconds),
        "iters": len(pass_seconds),
        "tokens_per_pass": tokens,
        "matmul_params": n,
        "precision": precision,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }
