"""Preference losses as pure functions over score tensors.

Bradley–Terry: P(chosen beats rejected) = σ(r_c - r_r), so the negative
log-likelihood of a preference is -log σ(r_c - r_r) = softplus(r_r - r_c)
(natural log; r_c=0, r_r=10 gives 10.0000454, r_c=5, r_r=0 gives 0.0067153).

InstructGPT's K-way loss: a prompt with K ranked responses gives C(K,2)
comparisons; all of them sit in ONE batch element, every response is scored
once (K forward passes, not 2·C(K,2)), and the prompt's loss is the mean of
its pairwise terms, so each prompt is weighted once however large K is
(training on each pair as its own example overfits, as the paper found).
A preference pair is the K=2 case, so one loss serves both data formats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair -log σ(r_c - r_r - margin), same shape as `chosen`.

    `margin` (as in Llama 2 and TRL): how much better the chosen response was
    rated; the model must separate the two by at least that to reach low loss.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    # softplus(-x) == -log σ(x), computed without overflow for large |x|.
    return F.softplus(-diff)


def pair_mask(ranks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, K, K) bool: True at [b, i, j] when response i is ranked strictly better than j.

    `ranks` (batch, K): 0 for the best group, 1 for the next...; tied responses
    share a rank and give no comparison. `valid` (batch, K) marks real
    responses when prompts have different K (padding slots are False).
    """
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)
    if valid is not None:
        better = better & valid.unsqueeze(2) & valid.unsqueeze(1)
    return better


def kway_ranking_loss(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor | None = None,
                      margin: torch.Tensor | None = None) -> torch.Tensor:
    """(batch,) per-prompt loss: the mean of the Bradley–Terry terms of all its ranked pairs.

    scores (batch, K): one score per response (each response scored once);
    ranks  (batch, K): best-first group index, ties equal (see `pair_mask`);
    valid  (batch, K): False on padding slots (prompts with fewer responses);
    margin (batch,):   optional, applied to every pair of that prompt.
    A prompt with no strict pair (all tied) contributes 0; readers reject such rows.
    """
    better = pair_mask(ranks, valid)  # (batch, K, K)
    diff = scores.float().unsqueeze(2) - scores.float().unsqueeze(1)  # [b, i, j] = r_i - r_j
    if margin is not None:
        diff = diff - margin.float()[:, None, None]
    terms = F.softplus(-diff) * better
    n_pairs = better.sum(dim=(1, 2)).clamp(min=1)
    return terms.sum(dim=(1, 2)) / n_pairs


def pairwise_accuracy(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) counts over the ranked pairs; a tie in score counts half."""
    better = pair_mask(ranks, valid)
    diff = scores.float().unsqueeze(2) - scores.float().unsqueeze(1)
    correct = ((diff > 0).float() + 0.5 * (diff == 0).float()) * better
    return correct.sum(), better.sum()
