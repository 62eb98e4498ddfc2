"""The FLOP count every benchmark divides by, checked on hand-computed cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ceiling import lm_matmul_flops, measure_fwd_bwd_flops_per_second  # noqa: E402

from alignloop.modeling import load_causal_lm  # noqa: E402


def test_lm_matmul_flops_forward_and_backward():
    # 1000 matmul parameters, 10 tokens: 2*1000*10 forward, 6*1000*10 forward+backward.
    assert lm_matmul_flops(1000, 10, backward=False) == 20_000
    assert lm_matmul_flops(1000, 10, backward=True) == 60_000


def test_ceiling_measures_positive_rate_and_restores_the_model(tiny_lm_dir):
    model = load_causal_lm(tiny_lm_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    out = measure_fwd_bwd_flops_per_second(model, batch_size=2, seq_len=16, precision="fp32", seconds=0.05)
    assert out["iters"] >= 3 and out["flops_per_second"] > 0
    assert out["flops_per_second"] == pytest.approx(
        lm_matmul_flops(out["matmul_params"], 32, backward=True) / out["seconds_per_pass"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_ppo_flops_per_episode_hand_computed():
    from ppo_vs_trl import ppo_flops_per_episode

    # policy N=10, reward model and critic N=4 each; 2 prompt + 3 response tokens (T=5); 4 PPO epochs.
    flops = ppo_flops_per_episode(10, 4, 4, prompt_tokens=2, response_tokens=3, ppo_epochs=4)
    assert flops["generation"] == 2 * 10 * 5  # one forward per token with a KV cache
    assert flops["scoring"] == 2 * (10 + 10 + 4 + 4) * 5  # reference, policy log-probs, RM, critic
    assert flops["update"] == 4 * 6 * (10 + 4) * 5  # forward+backward of policy and critic per epoch
    assert flops["total"] == 100 + 280 + 1680
