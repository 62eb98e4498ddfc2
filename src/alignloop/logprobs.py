"""Per-token log-probabilities of given responses under a model, in fp32.

Used wherever a response's likelihood matters outside the PPO inner loop:
KL to the reference and perplexity in evaluation.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .device import autocast
from .prompts import pad_right


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[label] per position, in fp32. logits (..., V), labels (...) -> (...)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


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
