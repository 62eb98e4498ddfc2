"""The PPO-RLHF math as small pure functions over tensors.

Shapes: every per-token tensor is (batch, response_len); `mask` is 1.0 on real
response tokens (the EOS included) and 0.0 on the padding after it. All of it
runs in fp32 whatever dtype the matmuls used: callers pass `.float()` tensors.
"""

from __future__ import annotations

import torch

from ..logprobs import row_chunks


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (as Bessel-corrected torch.var would give)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance over the masked entries; padding is left at 0.

    With shift_mean=False the mean is kept (used for rewards: whitening must not
    turn an all-good batch into half penalties).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    k1 = log pi - log pi_ref: unbiased, can be negative per token.
    k3 = (r - 1) - log r with r = pi_ref / pi: unbiased and always >= 0, lower variance
    (Schulman, "Approximating KL divergence"). The log-ratio is clamped before exp so a
    token the reference finds near-impossible cannot overflow to inf.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        log_r = (-log_ratio).clamp(-20.0, 20.0)
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator '{estimator}' (use 'k1' or 'k3')")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """The per-token reward: -beta * KL at every token, plus the sequence's score at its last token.

    scores (batch,), kl (batch, T). The score goes on the last real token (the EOS,
    or the last generated token of a truncated response): only then has the RM
    seen the whole response.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (batch,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over one response each.

    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1}
    The value after the last real token is 0 (the episode ends there), and the
    padding contributes nothing. Returns (advantages, returns = A + V), both 0 on padding.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        # On padding (mask 0) carry nothing backwards: the response ended before t.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's total reward, (B, T) -> (B,): its score minus beta times its whole KL.

    The critic-free methods judge a response as one action, so the per-token KL penalty
    becomes a sequence-level one (RLOO, Ahmadian et al. 2024; GRPO with the KL in the reward).
    """
    return (rewards * mask).sum(dim=1)


def group_normalized_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                                eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage (Shao et al. 2024): each reward minus its group's mean, over the group's std.

    rewards (B,), groups of `group_size` consecutive rows (one prompt's responses). The std is
    the unbiased one, as GRPO's reference code takes it. scale_by_std=False is Dr. GRPO (Liu et
    al. 2025): dividing by the std weighs prompts whose responses barely differ the most, a bias
    towards too-easy and too-hard prompts. A group whose rewards are all equal teaches nothing (0).
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage (Kool et al. 2019; Ahmadian et al. 2024): each reward minus the mean of the others.

    rewards (B,), groups of `group_size` >= 2 consecutive rows. The baseline leaves the response's
    own reward out, so it is independent of the action and the estimate stays unbiased;
    r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - mean_j r_j).
    """
    groups = rewards.view(-1, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over each response's real tokens: (B, T), 0 on padding.

    REINFORCE++'s per-token return (Hu 2025): with the score at the last token and -beta * KL at
    every token, token t is credited with the score and the KL of what follows it.
    """
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, summed over the masked tokens (the caller divides).

    Summing rather than averaging here lets gradient accumulation weight every
    token of a mini-batch equally however the micro-batches split it. `mask` may hold
    weights (`aggregation_weights`): the sums are then weighted, the ratio's max is not.
    Returns (loss_sum, stats) with stats summed the same way: clipped-token count and
    approx-KL sum (k3 between old and new policy, Schulman's estimator).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss_sum = masked_sum(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipped_tokens": masked_sum((clipped > unclipped).float(), mask),
            "approx_kl_sum": masked_sum(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_max": (ratio * (mask > 0)).max(),
        }
    return loss_sum, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2) summed over masked tokens, and the clipped-token count.

    Clipping the value change around the rollout's values keeps the critic from
    jumping on a single batch, as the policy clip does for the policy.
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss_sum = 0.5 * masked_sum(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipped_count = masked_sum((loss_clipped > loss_unclipped).float(), mask)
    return loss_sum, clipped_count


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits): logsumexp(l) - sum p * l. (B, T, V) -> (B, T).

    Computed a few rows at a time in fp32, never over a whole batch of fp32 logits (see logprobs.py)."""
    flat = logits.reshape(-1, logits.shape[-1])
    entropy = torch.empty(flat.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for start, stop in row_chunks(*flat.shape):
        x = flat[start:stop].to(entropy.dtype)
        p = torch.softmax(x, dim=-1)
        entropy[start:stop] = torch.logsumexp(x, dim=-1) - (p * x).sum(dim=-1)
    return entropy.view(logits.shape[:-1])


LOSS_AGGREGATIONS = ("token_mean", "sequence_mean")


def aggregation_weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Per-token weights whose sum over a mini-batch is the loss's divisor.

    token_mean: every token weighs 1, so long responses weigh more (PPO as OpenAI and TRL run it).
    sequence_mean: each response's tokens share a weight of 1, so every response weighs the same
    (GRPO's original form). Either way the weights are 0 on padding.
    """
    if aggregation == "token_mean":
        return mask
    if aggregation == "sequence_mean":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"unknown loss aggregation '{aggregation}' (use one of {', '.join(LOSS_AGGREGATIONS)})")
