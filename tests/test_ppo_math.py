"""PPO's pure functions against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.ppo.kl_control import KLController
from alignloop.ppo.losses import (
    aggregation_weights,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    group_normalized_advantages,
    kl_penalty,
    leave_one_out_advantages,
    masked_mean,
    ppo_policy_loss,
    returns_to_go,
    sequence_rewards,
    token_rewards,
    whiten,
)
from alignloop.rollout import draw_tokens, top_p_filter


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kl_k1_is_the_log_ratio_and_k3_is_r_minus_1_minus_log_r():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -2.0])
    assert kl_penalty(logp, ref, "k1").tolist() == [[1.0, 0.0]]
    # k3 with log r = ref - logp = -1: (e^-1 - 1) + 1 = e^-1
    assert kl_penalty(logp, ref, "k3")[0].tolist() == pytest.approx([math.exp(-1), 0.0], abs=1e-6)


def test_k3_stays_finite_when_the_reference_finds_a_token_impossible():
    out = kl_penalty(t([-0.1]), t([-1e4]), "k3")
    assert torch.isfinite(out).all() and out.item() > 0


def test_token_rewards_put_the_score_on_the_last_real_token():
    rewards = token_rewards(torch.tensor([2.0]), t([0.1, 0.2, 0.3]), kl_coef=0.5, mask=t([1.0, 1.0, 0.0]))
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1 + 2.0, 0.0])


def test_gae_hand_computed():
    # gamma 1, lam 0.5; V = 0.5 everywhere, reward 1 at the end.
    # t=2: delta = 1 + 0 - .5 = .5 -> A = .5 ; t=1: delta 0 -> A = .5*.5 ; t=0: A = .5*.25
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.5, 0.5]), t([1.0, 1.0, 1.0]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert ret[0].tolist() == pytest.approx([0.625, 0.75, 1.0])


def test_gae_ignores_padding_and_ends_the_episode_at_the_last_real_token():
    # The value 9 on padding must not leak back into the advantages.
    adv, ret = gae(t([0.0, 1.0, 0.0]), t([0.5, 0.5, 9.0]), t([1.0, 1.0, 0.0]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.25, 0.5, 0.0])
    assert ret[0].tolist() == pytest.approx([0.75, 1.0, 0.0])


def test_gae_discount():
    # gamma .5, lam 1: A_t = sum of discounted rewards - V_t with V = 0: [.25, .5, 1]
    adv, _ = gae(t([0.0, 0.0, 1.0]), t([0.0, 0.0, 0.0]), t([1.0, 1.0, 1.0]), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.25, 0.5, 1.0])


def test_whiten_over_the_masked_entries_only():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    assert whiten(x, mask)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)  # mean 2, unbiased var 1
    assert whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_policy_loss_clips_only_where_the_ratio_left_the_trust_region_in_the_advantage_direction():
    old = t([0.0, 0.0, 0.0])
    new = torch.log(t([1.5, 0.5, 0.5]))
    adv = t([1.0, 1.0, -1.0])
    loss_sum, stats = ppo_policy_loss(new, old, adv, torch.ones(1, 3), cliprange=0.2)
    # ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped); ratio .5, A=+1: max(-.5, -.8) = -.5;
    # ratio .5, A=-1: max(.5, .8) = .8 (clipped)
    assert loss_sum.item() == pytest.approx(-1.2 - 0.5 + 0.8, abs=1e-6)
    assert stats["clipped_tokens"].item() == 2
    assert stats["ratio_max"].item() == pytest.approx(1.5)


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    new = torch.log(t([1.5])).requires_grad_(True)
    loss, _ = ppo_policy_loss(new, t([0.0]), t([1.0]), torch.ones(1, 1), cliprange=0.2)
    loss.backward()
    assert new.grad.abs().sum().item() == 0.0


def test_clipped_value_loss_hand_computed():
    # old 0, new 1, return 2, clip .2: unclipped (1-2)^2 = 1, clipped (.2-2)^2 = 3.24 -> .5 * 3.24
    loss_sum, clipped = clipped_value_loss(t([1.0]), t([0.0]), t([2.0]), torch.ones(1, 1), cliprange_value=0.2)
    assert loss_sum.item() == pytest.approx(1.62)
    assert clipped.item() == 1.0


def test_entropy_of_uniform_logits_is_log_vocab():
    assert entropy_from_logits(torch.zeros(1, 2, 4))[0].tolist() == pytest.approx([math.log(4)] * 2)


def test_masked_mean():
    assert masked_mean(t([1.0, 3.0, 100.0]), t([1.0, 1.0, 0.0])).item() == 2.0


def test_adaptive_kl_controller_moves_beta_by_the_clipped_error():
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(measured_kl=0.5, n_episodes=10)  # below target before ever reaching it: beta held
    assert ctl.value == 0.1
    ctl.update(measured_kl=12.0, n_episodes=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(measured_kl=3.0, n_episodes=10)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    kept = torch.isfinite(top_p_filter(logits, 0.6))[0].tolist()
    assert kept == [False, True, True]  # .5 alone is short of .6; .5 + .3 reaches it
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_draw_tokens_follows_the_probabilities_and_never_draws_a_cut_token():
    # Two rows: one with a zero-probability token (as after top-p), one nearly one-hot.
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]])
    rows = probs.repeat(20000, 1)  # 20,000 draws per distribution
    tokens = draw_tokens(rows, torch.rand(len(rows), generator=torch.Generator().manual_seed(0))).view(20000, 2)
    first = torch.bincount(tokens[:, 0], minlength=4).float() / 20000
    assert first[1] == 0  # probability 0: never drawn
    assert torch.allclose(first, probs[0], atol=0.015)  # ~4 standard errors at n = 20,000
    assert (tokens[:, 1] == 3).all()
    # Rows that sum to a little less than 1 (rounding) still draw a valid token.
    assert draw_tokens(torch.tensor([[0.2, 0.3, 0.499]]), torch.tensor([0.9999])).item() in (0, 1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/cuda_check.sh runs it)")
def test_draw_tokens_on_cuda_takes_cpu_uniforms_and_draws_what_the_cpu_draws():
    # Our uniforms are drawn on the CPU (one seed, the same draws on any device; checkpointable
    # anywhere): probabilities on the GPU must still work, and give the CPU's tokens.
    probs = torch.softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    uniforms = torch.rand(64, generator=torch.Generator().manual_seed(3))
    on_cpu = draw_tokens(probs, uniforms)
    on_gpu = draw_tokens(probs.cuda(), uniforms)
    assert on_gpu.device.type == "cuda"
    # The cumulative sums may round differently on the GPU: a draw on an interval's edge may move.
    assert (on_gpu.cpu() == on_cpu).float().mean() >= 0.95


def test_loss_aggregation_weighs_tokens_or_responses():
    mask = t([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0])  # a 4-token response and a 1-token one
    assert aggregation_weights(mask, "token_mean").tolist() == mask.tolist()
    # sequence_mean: each response's tokens share one unit, so the short response weighs as much as the long one
    assert aggregation_weights(mask, "sequence_mean").tolist() == [[0.25] * 4, [1.0, 0.0, 0.0, 0.0]]
    per_token_loss = t([1.0, 1.0, 1.0, 1.0], [5.0, 9.0, 9.0, 9.0])  # padding values must not count
    w = aggregation_weights(mask, "sequence_mean")
    assert float((per_token_loss * w).sum() / w.sum()) == pytest.approx((1.0 + 5.0) / 2)
    w = aggregation_weights(mask, "token_mean")
    assert float((per_token_loss * w).sum() / w.sum()) == pytest.approx((4 * 1.0 + 5.0) / 5)


def test_policy_loss_ratio_max_ignores_weights_but_the_sum_uses_them():
    logp, old, adv = t([0.0, 0.0]), t([-1.0, 0.0]), t([1.0, 1.0])  # ratios e and 1
    loss, stats = ppo_policy_loss(logp, old, adv, t([0.5, 0.5]), cliprange=0.2)
    assert float(stats["ratio_max"]) == pytest.approx(math.e)
    assert float(loss) == pytest.approx(0.5 * -1.2 + 0.5 * -1.0)  # min(r*A, clip(r)*A) per token, weighted


def test_sequence_rewards_sum_the_score_and_the_kl_penalty_over_real_tokens():
    rewards, mask = t([-0.1, -0.2, 1.7], [-0.5, 2.0, 9.0]), t([1, 1, 1], [1, 1, 0])
    assert torch.allclose(sequence_rewards(rewards, mask), t(1.4, 1.5))


def test_grpo_advantages_centre_each_group_and_scale_by_its_unbiased_std():
    rewards = t(1.0, 3.0, 5.0, 5.0)  # two prompts, two responses each
    # group 1: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2); group 2 has nothing to learn
    expected = 1 / (math.sqrt(2) + 1e-4)
    assert torch.allclose(group_normalized_advantages(rewards, 2), t(-expected, expected, 0.0, 0.0))
    # Dr. GRPO: centred only
    assert torch.equal(group_normalized_advantages(rewards, 2, scale_by_std=False), t(-1.0, 1.0, 0.0, 0.0))


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others():
    rewards = t(1.0, 2.0, 6.0, 0.0, 0.0, 3.0)
    # 1 - (2+6)/2 = -3 ; 2 - (1+6)/2 = -1.5 ; 6 - (1+2)/2 = 4.5 ; 0 - 1.5 ; 0 - 1.5 ; 3 - 0
    assert torch.allclose(leave_one_out_advantages(rewards, 3), t(-3.0, -1.5, 4.5, -1.5, -1.5, 3.0))
    # the same as K/(K-1) * (r - group mean)
    assert torch.allclose(leave_one_out_advantages(rewards, 3),
                          1.5 * (rewards.view(2, 3) - rewards.view(2, 3).mean(1, keepdim=True)).reshape(-1))


def test_returns_to_go_sum_what_follows_each_token_and_stop_at_the_response_end():
    rewards, mask = t([1.0, 2.0, 3.0], [4.0, 5.0, 7.0]), t([1, 1, 1], [1, 1, 0])
    assert torch.equal(returns_to_go(rewards, mask), t([6.0, 5.0, 3.0], [9.0, 5.0, 0.0]))
    # gamma 0.5: 3 ; 2 + 0.5 * 3 = 3.5 ; 1 + 0.5 * 3.5 = 2.75
    assert torch.allclose(returns_to_go(rewards, mask, gamma=0.5)[0], torch.tensor([2.75, 3.5, 3.0]))
