"""PPO end to end on a tiny random GPT-2: token layout, resume, LoRA, critic options, guards."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file

from alignloop.errors import ConfigError
from alignloop.mixed_precision import MasterWeights
from alignloop.modeling import build_causal_lm, load_causal_lm, load_tokenizer
from alignloop.ppo import PPOConfig, PPOTrainer, ppo
from alignloop.prompts import encode_prompt, encode_response
from alignloop.reward.model import RewardModel
from alignloop.rollout import (
    batch_from_lists,
    episode_uniforms,
    left_pad,
    sample_responses,
    scalar_head_outputs,
    sequence_scores,
)



def small_config(tiny_lm_dir, rm_dir, prompts_file, out_dir, **overrides) -> PPOConfig:
    values = dict(policy=tiny_lm_dir, reward_model=rm_dir, prompts=prompts_file, out_dir=out_dir, steps=3,
                  batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, max_new_tokens=8,
                  lr=1e-3, precision="fp32", tensorboard=False, checkpoint_every=0)
    values.update(overrides)
    return PPOConfig(**values)


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_an_episode_is_sampled_alike_alone_or_in_any_batch_from_its_uniforms(tiny_lm_dir):
    """What lets N processes sample the one-process run's episodes: a row's draws are its own
    (not its batch position's, nor how many rows are still running) and the prompt width is the batch's."""
    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir, "cpu", tok)
    prompts = [encode_prompt(tok, text) for text in ("Love is", "A much longer prompt than the other one",
                                                     "Some", "The sea at night")]
    uniforms = episode_uniforms(seed=5, step=2, episodes=len(prompts), max_new_tokens=24)
    assert torch.equal(uniforms, episode_uniforms(5, 2, len(prompts), 24))
    assert not torch.equal(uniforms, episode_uniforms(5, 3, len(prompts), 24))  # another step, other draws
    width = max(len(p) for p in prompts)

    def sample(rows, compact_fraction=0.25):
        ids, mask = left_pad([prompts[i] for i in rows], tok.pad_token_id, torch.device("cpu"), width)
        out = sample_responses(model, ids, mask, 24, tok.eos_token_id, tok.pad_token_id, uniforms=uniforms[rows],
                               compact_fraction=compact_fraction)
        return [out.responses[r][out.response_mask[r] == 1].tolist() for r in range(len(rows))]

    together = sample([0, 1, 2, 3])
    assert len({len(r) for r in together}) > 1  # lengths differ: rows left the batch at different steps
    assert sample([3, 2]) == [together[3], together[2]]
    assert [sample([i])[0] for i in range(4)] == together
    assert sample([0, 1, 2, 3], compact_fraction=0) == together


def test_sampler_matches_hf_generate_greedy_with_left_padding(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir, "cpu", tok)
    prompts = [encode_prompt(tok, "Love is"), encode_prompt(tok, "A much longer prompt than the other one")]
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    ours = sample_responses(model, ids, mask, 10, tok.eos_token_id, tok.pad_token_id, greedy=True)
    for row, p in enumerate(prompts):  # each prompt alone, no padding at all
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):]
        n = int(ours.response_mask[row].sum())
        assert ours.responses[row, :n].tolist() == ref[:n].tolist()


def test_rows_that_end_leave_the_batch_without_changing_the_others(tiny_tokenizer):
    """Ended rows are dropped from the KV cache mid-loop; every row must still get exactly its own tokens.

    Greedy decoding with no stop token gives each prompt's full continuation; then a token that
    those continuations reach at different steps is made the stop token, so rows end (and are
    dropped) at different times, and each row must be its full continuation cut at that token.
    """
    tok = tiny_tokenizer
    model = build_causal_lm(tok, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=0).eval()
    with torch.no_grad():  # sharp random weights: greedy text that varies instead of one token repeated
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(16)
    texts = ["Love is", "A much longer prompt than the other one", "Never", "The sea", "Computers are",
             "If you", "Time flies like an arrow", "What"]
    ids, mask = left_pad([encode_prompt(tok, t) for t in texts], tok.pad_token_id, torch.device("cpu"))
    full = sample_responses(model, ids, mask, 16, eos_id=-1, pad_id=tok.pad_token_id, greedy=True).responses

    def first_at(row, token):
        hits = (full[row] == token).nonzero()
        return int(hits[0]) if len(hits) else None

    # The token whose first occurrences end the most rows at the most distinct steps.
    candidates = torch.unique(full).tolist()
    stop = max(candidates, key=lambda t: len({first_at(r, t) for r in range(len(texts))} - {None}))
    ends = [first_at(r, stop) for r in range(len(texts))]
    assert len(set(ends) - {None}) >= 3  # rows really do end at different steps

    cut = sample_responses(model, ids, mask, 16, eos_id=stop, pad_id=tok.pad_token_id, greedy=True)
    for row, end in enumerate(ends):
        n = int(cut.response_mask[row].sum())
        assert n == (end + 1 if end is not None else 16)
        assert cut.responses[row, :n].tolist() == full[row, :n].tolist()
    assert cut.responses.shape[1] == max(n + 1 if n is not None else 16 for n in ends)
    kept = sample_responses(model, ids, mask, 16, eos_id=stop, pad_id=tok.pad_token_id, greedy=True,
                            compact_fraction=0)  # every row stays to the end
    assert torch.equal(kept.responses, cut.responses) and torch.equal(kept.response_mask, cut.response_mask)


def test_reward_in_the_rollout_layout_equals_scoring_the_text(tiny_lm_dir, rm_dir):
    """The RM sees left-padded prompts in PPO and right-padded text in `score`: same number either way."""
    rm = RewardModel.from_pretrained(rm_dir)
    tok = rm.tokenizer
    prompts, responses = ["Short", "A much longer prompt than the other"], [" one two three", " four"]
    batch = batch_from_lists([encode_prompt(tok, p) for p in prompts],
                             [encode_response(tok, r) for r in responses], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        in_layout = sequence_scores(scalar_head_outputs(rm.model, batch, "fp32"), batch)
    assert in_layout.tolist() == pytest.approx(rm.score(prompts, responses, normalize=False), abs=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: fp32 masters in the checkpoint, bf16 in the models
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny_lm_dir, rm_dir, prompts_file, tmp_path, monkeypatch,
                                                            precision):
    whole = ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "whole", steps=4, precision=precision))

    killed_dir = tmp_path / "killed"
    real_step = PPOTrainer.step

    def dies_on_step_3(self):
        if self.step_index == 2:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    monkeypatch.setattr(PPOTrainer, "step", dies_on_step_3)
    with pytest.raises(KeyboardInterrupt):
        ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, killed_dir, steps=4, checkpoint_every=2,
                         precision=precision))
    monkeypatch.setattr(PPOTrainer, "step", real_step)
    resumed = ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, killed_dir, steps=4, checkpoint_every=2,
                               precision=precision))

    assert resumed["resumed_from_step"] == 2
    a, b = weights(tmp_path / "whole"), weights(killed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_score_mean"] == pytest.approx(whole["final_score_mean"], abs=1e-6)
    steps_logged = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 4]  # no step twice after the resume


def test_bf16_master_weights_train_exactly_like_plain_autocast(tiny_lm_dir, rm_dir, prompts_file, tmp_path,
                                                               monkeypatch):
    """bf16 weights in the models + fp32 masters in the optimiser = autocast's own casts, minus their cost.

    Same roundings of the same fp32 weights in every forward, same bf16 gradients summed in fp32:
    the policy, the critic and every logged figure come out identical, and the saved weights are fp32.
    """
    import alignloop.ppo.models as models_module

    cfg = dict(precision="bf16", steps=2, critic_warmup_steps=1)  # warm-up: the policy masters must stay put too
    trainer = PPOTrainer(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "masters", **cfg))
    c_fc = trainer.policy.transformer.h[0].mlp.c_fc.weight
    assert c_fc.dtype == torch.bfloat16 and trainer.reference.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.trained_params)  # the optimiser steps fp32 masters
    assert trainer.policy.transformer.wte.weight.dtype == torch.float32  # embeddings (and the tied LM head) stay
    ours = trainer.train()
    monkeypatch.setattr(models_module, "MasterWeights",
                        lambda models, enabled: MasterWeights(models, enabled=False))  # plain autocast
    monkeypatch.setattr(models_module, "cast_frozen_matmul_weights", lambda model, **kwargs: model)
    plain = ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "autocast", **cfg))

    for sub in ("", "critic"):
        a, b = weights(tmp_path / "masters" / sub), weights(tmp_path / "autocast" / sub)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), (sub, k)
    before = weights(tiny_lm_dir)
    assert any(not torch.equal(before[k], weights(tmp_path / "masters")[k]) for k in before)  # it did train
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("masters", "autocast")]
    for key in ("score_mean", "kl_mean", "pg_loss", "vf_loss", "grad_norm", "entropy_mean"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    assert ours["final_score_mean"] == plain["final_score_mean"]


def test_starting_from_other_policy_weights_sets_the_fp32_masters_too(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    """A later round starts PPO from the last round's policy: the optimiser's fp32 masters must start there too."""
    trainer = PPOTrainer(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "r2", precision="bf16"))
    assert trainer.master_weights.entries[0]  # the policy's matmul weights have masters
    other = {k: v + 0.01 for k, v in load_causal_lm(tiny_lm_dir, "cpu", trainer.tokenizer).state_dict().items()}
    trainer.load_policy_weights(other)
    held = trainer.state_dict()["models"]["policy"]  # what a checkpoint (and the optimiser) sees
    assert all(torch.equal(held[k], other[k]) for k in other)
    c_fc = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(trainer.policy.state_dict()[c_fc], other[c_fc].bfloat16())  # the model computes with these


def test_policy_moves_and_writes_a_plain_hf_directory(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    out = tmp_path / "policy"
    summary = ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, out))
    assert summary["steps"] == 3 and summary["stopped"] is None
    before, after = weights(tiny_lm_dir), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(out)  # no alignloop code needed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("kl_mean", "score_mean", "non_score_reward", "entropy_mean", "clipfrac", "approx_kl", "vf_loss",
                "response_length_mean", "eos_rate", "seconds_rollout", "seconds_update"):
        assert key in rows[-1]
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the first rollout
    assert (out / "samples.jsonl").is_file() and (out / "critic" / "config.json").is_file()
    # The sampler's log-probs are the trainer's (a KV-cache decode vs one full forward, fp32): the gap is rounding.
    assert all(0 <= r["sampler_logprob_gap"] <= r["sampler_logprob_gap_max"] < 1e-4 for r in rows)


def test_a_gold_reward_model_scores_every_step_without_changing_the_run(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    plain = ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "plain", steps=2))
    judged = ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "judged", steps=2, gold_reward_model=rm_dir))
    rows = [json.loads(line) for line in (tmp_path / "judged" / "metrics.jsonl").read_text().splitlines()]
    # the gold RM here is the proxy itself: the same scores, logged, and nothing else moves
    assert all(r["gold_score_mean"] == pytest.approx(r["score_mean"], abs=1e-6) and r["seconds_gold_scoring"] > 0
               for r in rows)
    assert judged["final_gold_score_mean"] == pytest.approx(judged["final_score_mean"], abs=1e-6)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "judged")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "final_gold_score_mean" not in plain
    assert "gold_score" in json.loads((tmp_path / "judged" / "samples.jsonl").read_text().splitlines()[0])


def test_a_sampler_drawing_from_a_cut_distribution_reports_no_logprob_gap(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    trainer = PPOTrainer(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path, top_p=0.9))
    exp = trainer.rollout(0)
    assert exp.batch.sampled_logprobs is None and "sampler_logprob_gap" not in trainer.experience_metrics(exp)


def test_lora_trains_adapters_only_and_the_reference_is_the_adapter_free_model(tiny_lm_dir, rm_dir, prompts_file,
                                                                               tmp_path):
    cfg = small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "lora", lora_r=4, lr=5e-3)
    trainer = PPOTrainer(cfg)
    assert trainer.reference is None
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    summary = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["kl_mean"] != 0.0  # the adapters moved the policy away from the reference
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # merged: a plain model
    assert merged is not None and (tmp_path / "lora" / "adapter").is_dir()
    assert summary["steps"] == 3


def test_under_lora_a_separate_critic_still_trains_bf16_weights_with_fp32_masters(tiny_lm_dir, rm_dir, prompts_file,
                                                                                   tmp_path):
    cfg = small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "lora", lora_r=4, lr=5e-3, critic="separate",
                       precision="bf16")
    trainer = PPOTrainer(cfg)
    critic = trainer.models.critic
    assert trainer.models.masters.models == [critic]  # the policy trains only its fp32 adapters: no masters
    assert critic.score.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in trainer.policy.named_parameters() if "lora_" in n} == {torch.float32}
    trainer.train()
    saved = weights(tmp_path / "lora" / "critic")
    start = weights(rm_dir)
    assert saved["score.weight"].dtype == torch.float32  # saved from the masters
    assert not torch.equal(saved["score.weight"], start["score.weight"])


def test_under_lora_a_bf16_base_is_autocasts_numbers_and_the_merge_adds_the_adapters_to_the_fp32_base(
        tiny_lm_dir, rm_dir, prompts_file, tmp_path, monkeypatch):
    """The frozen base holds bf16 weights (autocast recasts a frozen weight at every decoding step); the
    run is the autocast run bit for bit, and the merged policy is the fp32 base plus the adapters."""
    import alignloop.ppo.models as models_module

    cfg = dict(lora_r=4, lr=5e-3, precision="bf16", steps=2)
    trainer = PPOTrainer(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "bf16_base", **cfg))
    dtypes = {n: p.dtype for n, p in trainer.policy.named_parameters()}
    assert dtypes["base_model.model.transformer.h.0.mlp.c_fc.base_layer.weight"] == torch.bfloat16
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert dtypes["base_model.model.transformer.wte.weight"] == torch.float32  # embeddings (and the tied head) stay
    trainer.train()
    monkeypatch.setattr(models_module, "cast_frozen_matmul_weights", lambda model, **kwargs: model)
    ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "autocast", **cfg))
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("bf16_base", "autocast")]
    for key in ("score_mean", "kl_mean", "pg_loss", "grad_norm"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    ours, plain, base = weights(tmp_path / "bf16_base"), weights(tmp_path / "autocast"), weights(tiny_lm_dir)
    assert ours.keys() == plain.keys()
    for k in ours:
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], plain[k]), k
    assert any(not torch.equal(ours[k], base[k]) for k in base)  # the adapters were merged in


def test_critic_warmup_leaves_the_policy_alone_and_value_head_critic_runs(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    out = tmp_path / "warm"
    ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, out, steps=2, critic_warmup_steps=1, critic="value_head"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # step 2 samples from the unchanged policy
    assert not (out / "critic").exists()  # the value head lives on the policy trunk


def first_update_gradients(config: PPOConfig) -> dict[str, torch.Tensor]:
    trainer = PPOTrainer(config)
    rollout = trainer.rollout(0)
    captured: dict[str, torch.Tensor] = {}

    def capture(*args, **kwargs):  # instead of the optimiser step: record what it would apply
        if not captured:
            captured.update({n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    trainer.update(rollout, train_policy=True)
    return captured


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_gradient_accumulation_gives_the_same_gradient_as_one_big_micro_batch(tiny_lm_dir, rm_dir, prompts_file,
                                                                                tmp_path, aggregation):
    """The mean over the mini-batch: splitting it into micro-batches changes memory, not the update.

    The unsplit side also takes the path that reuses the rollout's forwards for the first update."""
    common = dict(mini_batch_size=4, ppo_epochs=1, loss_aggregation=aggregation, kl_loss_coef=0.1)
    whole = first_update_gradients(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "a",
                                                gradient_accumulation_steps=1, **common))
    split = first_update_gradients(small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "b",
                                                gradient_accumulation_steps=4, **common))
    assert whole.keys() == split.keys() and whole
    assert any(g.abs().sum() > 0 for g in whole.values())
    for name in whole:
        assert torch.allclose(whole[name], split[name], rtol=1e-4, atol=1e-7), name


def test_collapse_guard_stops_and_keeps_the_last_good_policy(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    out = tmp_path / "guard"
    # A ratio limit below 1 + epsilon trips on the first update that moves the policy at all.
    summary = ppo(small_config(tiny_lm_dir, rm_dir, prompts_file, out, ratio_stop=1.0 + 1e-9, lr=1e-2))
    assert summary["stopped"] and "policy ratio" in summary["stopped"]
    before, after = weights(tiny_lm_dir), weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step-0 state, untouched


def test_config_checks_the_batch_algebra_up_front(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="multiple of mini_batch_size"):
        small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path, batch_size=6, mini_batch_size=4)
    with pytest.raises(ConfigError, match="multiple of gradient_accumulation_steps"):
        small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path, mini_batch_size=2, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="kl_estimator"):
        small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path, kl_estimator="k2")


def test_groups_of_samples_per_prompt_and_a_kl_loss_term(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    """The seam critic-free methods plug into: G responses per prompt side by side, KL as a loss term."""
    cfg = small_config(tiny_lm_dir, rm_dir, prompts_file, tmp_path / "groups", samples_per_prompt=2, kl_coef=0.0,
                       kl_loss_coef=0.1, loss_aggregation="sequence_mean", steps=2)
    trainer = PPOTrainer(cfg)
    chosen = trainer.experience.step_prompts(0)
    assert len(chosen) == cfg.batch_size and chosen[0::2] == chosen[1::2]  # each prompt twice, in a row
    exp = trainer.rollout(0)
    prompts = exp.batch.input_ids[:, :exp.batch.prompt_width]
    assert torch.equal(prompts[0], prompts[1]) and torch.equal(prompts[2], prompts[3])
    summary = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "groups" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all("kl_loss" in r and r["kl_loss"] >= 0 for r in rows)
    assert all(r["non_score_reward"] == 0.0 for r in rows)  # beta 0: no KL in the reward, only in the loss
