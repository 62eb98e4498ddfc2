"""Evaluation figures on hand-checkable cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignloop.errors import ConfigError
from alignloop.evaluate import EvaluateConfig, distinct_n, evaluate, prompt_relevance, win_rate
from alignloop.logprobs import response_logprobs, token_logprobs
from alignloop.modeling import load_causal_lm, load_tokenizer
from alignloop.prompts import encode_prompt, encode_response
from alignloop.reward.model import RewardModel, init_reward_model


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_distinct_2_hand_computed():
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 3 distinct of 5; a one-word text has none
    assert distinct_n(["a b a b", "a b c", "word"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["x y z"], 1) == 1.0 and distinct_n(["one"], 2) == 0.0


def test_prompt_relevance_hand_computed():
    # replies 1 and 2 likelier after their own prompt, reply 3 equally likely after either: (1 + 1 + 1/2) / 3;
    # margins 2 + 0.5 + 0 nats over 4 + 1 + 5 tokens
    r = prompt_relevance([-2.0, -5.0, -3.0], [-4.0, -5.5, -3.0], [4, 1, 5])
    assert r["prompt_relevance"] == pytest.approx(2.5 / 3)
    assert r["prompt_relevance_nats_per_token"] == pytest.approx(2.5 / 10)


def test_token_logprobs_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # two positions, vocab 2
    labels = torch.tensor([[1, 0]])
    lp = token_logprobs(logits, labels)
    expected = [-torch.log(torch.tensor(2.0)).item(), -torch.log1p(torch.exp(torch.tensor(-2.0))).item()]
    assert lp[0].tolist() == pytest.approx(expected, abs=1e-6)
    # temperature divides the logits: T=2 makes position 2 logits (1, 0)
    assert token_logprobs(logits, labels, 2.0)[0, 1].item() == pytest.approx(-torch.log1p(torch.exp(torch.tensor(-1.0))).item(), abs=1e-6)


def test_token_logprobs_gradient_hand_computed():
    # vocab 2, logits (2, 0), label 0, T = 2: d logp / d logits = (onehot - softmax(logits / T)) / T
    logits = torch.tensor([[2.0, 0.0]], requires_grad=True)
    token_logprobs(logits, torch.tensor([0]), 2.0).sum().backward()
    p0 = 1 / (1 + math.exp(-1.0))
    assert logits.grad[0].tolist() == pytest.approx([(1 - p0) / 2, -(1 - p0) / 2], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_the_log_softmax_it_replaces(monkeypatch, dtype, temperature):
    # Several chunks (a small CHUNK_ELEMENTS), a bf16 input, a temperature: values and gradients
    # are the plain log_softmax-then-gather's, up to float rounding, and the gradient keeps the
    # logits' dtype.
    monkeypatch.setattr("alignloop.logprobs.CHUNK_ELEMENTS", 64)
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 40)).to(dtype).requires_grad_(True)
    labels, weights = torch.randint(0, 40, (3, 5)), torch.randn(3, 5)
    (token_logprobs(logits, labels, temperature) * weights).sum().backward()
    fused = logits.grad.clone()
    logits.grad = None
    plain = torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (plain * weights).sum().backward()
    assert torch.allclose(token_logprobs(logits, labels, temperature), plain, atol=1e-5)
    assert fused.dtype == dtype
    assert torch.allclose(fused.float(), logits.grad.float(), atol=1e-6 if dtype == torch.float32 else 4e-3)


def test_token_logprobs_pass_gradcheck_in_fp64():
    labels = torch.tensor([[1, 0, 6], [3, 3, 2]])
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, 0.5), (logits,))


def test_response_logprobs_match_unpadded_forward(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir, "cpu", tok)
    prompts = [encode_prompt(tok, "Short"), encode_prompt(tok, "A much longer prompt than the other")]
    responses = [encode_response(tok, " one two three"), encode_response(tok, " four")]
    batched = response_logprobs(model, prompts, responses, tok.pad_token_id)
    for p, r, lp in zip(prompts, responses, batched):
        ids = torch.tensor([p + r])
        alone = token_logprobs(model(ids).logits[:, :-1], ids[:, 1:])[0, len(p) - 1:]
        assert lp.shape == (len(r),)
        assert torch.allclose(lp, alone, atol=1e-5)


def test_evaluate_policy_equal_to_reference_gives_zero_kl_and_even_win_rate(tmp_path, tiny_lm_dir):
    rm_dir = tmp_path / "rm"
    RewardModel(init_reward_model(tiny_lm_dir), load_tokenizer(tiny_lm_dir)).save_pretrained(rm_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Love is", "The sky", "Never", "Why"]))
    s = evaluate(EvaluateConfig(policy=tiny_lm_dir, reference=tiny_lm_dir, reward_model=rm_dir, prompts=prompts,
                                out_dir=tmp_path / "eval", max_new_tokens=8, precision="fp32", other_judges=["afinn"]))
    assert s["kl_to_reference_mean"] == pytest.approx(0.0, abs=1e-5)
    # same samples: every item a tie, for every judge
    assert s["win_rate_policy_over_sft"] == {"by_rm": 0.5, "by_judge": 0.5, "by_afinn": 0.5}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all(r["policy_afinn"] == r["sft_afinn"] for r in rows)
    assert 0 <= s["policy"]["distinct_2"] <= 1
    assert 0 <= s["policy"]["prompt_relevance"] <= 1
    assert s["policy"] == s["sft"]
    assert s["policy_perplexity_under_reference"] > 1
    assert (tmp_path / "eval" / "samples.jsonl").is_file()


def test_best_of_n_picks_the_rm_best_sample_and_reports_its_kl_bound(tmp_path, tiny_lm_dir):
    """Best-of-4 of the reference by an RM: it beats the reference by that RM, and a gold RM scores both sides."""
    import math

    from alignloop.evaluate import best_of_n_kl

    tok = load_tokenizer(tiny_lm_dir)
    torch.manual_seed(0)
    rm_dir, gold_dir = tmp_path / "rm", tmp_path / "gold"
    RewardModel(init_reward_model(tiny_lm_dir), tok).save_pretrained(rm_dir)
    RewardModel(init_reward_model(tiny_lm_dir), tok).save_pretrained(gold_dir)  # another random head
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{p} {i}"}) + "\n"
                               for p in ["Love is", "The sky", "Never", "Why"] for i in range(4)))
    s = evaluate(EvaluateConfig(policy=tiny_lm_dir, reference=tiny_lm_dir, reward_model=rm_dir,
                                gold_reward_model=gold_dir, best_of_n=4, prompts=prompts, out_dir=tmp_path / "eval",
                                max_new_tokens=8, precision="fp32"))
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    # the policy is the reference itself, so the whole KL is the selection's
    assert s["kl_to_reference_mean"] == pytest.approx(math.log(4) - 0.75, abs=1e-5)
    assert s["best_of_n"] == 4 and s["policy"]["rm_score_mean"] > s["sft"]["rm_score_mean"]
    assert s["win_rate_policy_over_sft"]["by_rm"] > 0.5
    assert set(s["win_rate_policy_over_sft"]) == {"by_rm", "by_judge", "by_gold"}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all("policy_gold" in r and "sft_gold" in r for r in rows)
    assert s["policy"]["gold_score_mean"] == pytest.approx(sum(r["policy_gold"] for r in rows) / 16)


def test_other_judges_are_checked_before_sampling(tmp_path, tiny_lm_dir):
    with pytest.raises(ConfigError, match="label function .nosuch."):
        EvaluateConfig(policy=tiny_lm_dir, reference=tiny_lm_dir, reward_model=tiny_lm_dir, other_judges=["nosuch"])
    with pytest.raises(ConfigError, match="must be different"):
        EvaluateConfig(policy=tiny_lm_dir, reference=tiny_lm_dir, reward_model=tiny_lm_dir, other_judges=["vader"])
