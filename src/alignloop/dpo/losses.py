"""DPO and IPO as pure functions over sequence log-probabilities.

Inputs are, per pair, the summed log-probability of the chosen and of the rejected response
(prompt excluded, EOS included) under the policy being trained and under the frozen reference.
The implicit reward of a response is β·log(π(y|x) / π_ref(y|x)) (DPO's reparameterisation of
the reward), and both losses return it detached, for the metrics.

DPO (Rafailov et al. 2023): the Bradley–Terry likelihood of the preference under that reward,
  loss = -log σ(β·[(log π_c - log π_ref,c) - (log π_r - log π_ref,r)]).
With `label_smoothing` ε (conservative DPO, Mitchell 2023: each label is wrong with
probability ε) the loss is -(1-ε)·log σ(β·x) - ε·log σ(-β·x); ε = 0 is plain DPO.

IPO (Azar et al. 2023, eq. 17): a squared loss that pulls the log-ratio difference to 1/(2τ)
instead of pushing it to infinity, so it does not overfit deterministic preferences; here β is τ.
The log-ratios are per-token means (summed log-ratio / response tokens), as TRL computes them
with the IPO authors' agreement: a sum would make the target 1/(2τ) mean different things for
short and long responses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo")


class PreferenceLoss(NamedTuple):
    loss: torch.Tensor  # (pairs,) per-pair loss, differentiable
    chosen_rewards: torch.Tensor  # (pairs,) β·log(π/π_ref) of the chosen response, detached
    rejected_rewards: torch.Tensor  # (pairs,) the same for the rejected one


def implicit_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """β·(log π(y|x) - log π_ref(y|x)) per response, detached: DPO's reward of a response."""
    return beta * (policy.detach().float() - reference.float())


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> PreferenceLoss:
    """Per-pair DPO loss (conservative DPO when label_smoothing > 0). All inputs (pairs,) sequence log-probs."""
    logits = (policy_chosen.float() - reference_chosen.float()) - (policy_rejected.float() - reference_rejected.float())
    # softplus(-x) == -log σ(x), without overflow for large |x|.
    loss = (1 - label_smoothing) * F.softplus(-beta * logits) + label_smoothing * F.softplus(beta * logits)
    return PreferenceLoss(loss, implicit_rewards(policy_chosen, reference_chosen, beta),
                          implicit_rewards(policy_rejected, reference_rejected, beta))


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, chosen_tokens: torch.Tensor,
             rejected_tokens: torch.Tensor) -> PreferenceLoss:
    """Per-pair IPO loss (h - 1/(2β))², h the difference of per-token mean log-ratios.

    `chosen_tokens` / `rejected_tokens` (pairs,): response lengths in tokens (EOS included).
    """
    chosen = (policy_chosen.float() - reference_chosen.float()) / chosen_tokens.float().clamp(min=1)
    rejected = (policy_rejected.float() - reference_rejected.float()) / rejected_tokens.float().clamp(min=1)
    loss = (chosen - rejected - 1 / (2 * beta)) ** 2
    return PreferenceLoss(loss, implicit_rewards(policy_chosen, reference_chosen, beta),
                          implicit_rewards(policy_rejected, reference_rejected, beta))


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Number of pairs whose chosen response has the higher implicit reward; a tie counts half.

    Ties are exact at the start (policy = reference gives every reward 0): half credit reads as
    chance there, where counting them wrong (as TRL does) would read as 0 %.
    """
    diff = chosen_rewards - rejected_rewards
    return (diff > 0).float().sum() + 0.5 * (diff == 0).float().sum()
