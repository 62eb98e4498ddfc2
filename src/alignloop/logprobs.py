"""Per-token log-probabilities of given responses under a model, in fp32.

`token_logprobs` is the log-prob of chosen tokens everywhere: PPO's and DPO's losses, KL to the
reference, perplexity in evaluation.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .device import autocast
from .prompts import pad_right


# Rows of logits taken at once: each chunk's fp32 copy stays ~8 MB, small enough for the allocator to
# reuse; a whole batch's fp32 logits (75 MB at 8 x 48 tokens of a 49k vocabulary) is mapped fresh by
# glibc at every call and costs more in page faults than in arithmetic.
CHUNK_ELEMENTS = 1 << 21


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[label] per position, in fp32. logits (..., V), labels (...) -> (...).

    The same values as `log_softmax(logits.float() / T).gather(labels)`, computed as
    `logit[label] / T - logsumexp(logits / T)` chunk by chunk, with a backward that recomputes
    softmax per chunk: no whole-batch fp32 log-softmax is ever stored. On PPO's update shapes
    that chain of full-vocabulary tensors (cast, scale, log-softmax, gather and their backwards)
    took longer than the LM head's matmul.
    """
    return SelectedTokenLogprobs.apply(logits, labels, float(temperature))


def row_chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def scaled_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh copy of `logits` / T in fp32 (fp64 stays fp64), fresh so that it may be changed in place."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    return x.div_(temperature) if temperature != 1.0 else x


class SelectedTokenLogprobs(torch.autograd.Function):
    """`token_logprobs` as one autograd node: saves the logits (in their own dtype) and the
    log-normalisers; d logp[label] / d logits = (onehot(label) - softmax(logits / T)) / T."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        vocab = logits.shape[-1]
        flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1, 1)
        selected = torch.empty(flat.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32),
                               device=logits.device)
        lse = torch.empty_like(selected)
        for start, stop in row_chunks(flat.shape[0], vocab):
            x = scaled_fp32(flat[start:stop], temperature)
            lse[start:stop] = torch.logsumexp(x, dim=-1)
            selected[start:stop] = x.gather(-1, flat_labels[start:stop]).squeeze(-1) - lse[start:stop]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return selected.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_selected: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        temperature, vocab = ctx.temperature, logits.shape[-1]
        flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1, 1)
        scale = (grad_selected.reshape(-1).to(lse.dtype) / temperature).unsqueeze(-1)  # dL/dlogp, times d(x/T)/dx
        grad = torch.empty_like(flat)
        for start, stop in row_chunks(flat.shape[0], vocab):
            g = scale[start:stop]
            x = scaled_fp32(flat[start:stop], temperature)
            x.sub_(lse[start:stop].unsqueeze(-1)).exp_().mul_(-g)  # -g * softmax
            x.scatter_add_(-1, flat_labels[start:stop], g)  # + g at the label
            grad[start:stop] = x
        return grad.view(logits.shape), None, None


@torch.no_grad()
def response_logprobs(model: PreTrainedModel, prompt_ids: list[list[int]], response_ids: list[list[int]],
                      pad_id: int, precision: str = "fp32", temperature: float = 1.0,
                      batch_size: int = 32) -> list[torch.Tensor]:
    """For each (prompt, response), a (len(response),) tensor of log p(response token | everything before)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_right([prompt_ids[i] + response_ids[i] for i in idx], pad_id)
        ids_t, mask_t = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
        with autocast(device, precision):
            logits = model(input_ids=ids_t, attention_mask=mask_t).logits
        # Position t predicts token t+1. One row's response positions at a time: the fp32 log-softmax
        # over the vocabulary is the largest tensor here (a 49k vocabulary makes it 10x the model's
        # activations), and a whole batch of it, prompts and padding included, would set the peak.
        for row, i in enumerate(idx):
            p, r = len(prompt_ids[i]), len(response_ids[i])
            out[i] = token_logprobs(logits[row, p - 1:p - 1 + r], ids_t[row, p:p + r], temperature).cpu()
    return out
