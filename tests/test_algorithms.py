"""The critic-free methods on PPO's loop (GRPO, RLOO, REINFORCE++): no critic, their advantages, resume after SIGKILL."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignloop.errors import ConfigError
from alignloop.ppo import PPOConfig, PPOTrainer
from test_resume import alignloop

CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")



def settings(tiny_lm_dir, rm_dir, prompts_file, out_dir, **overrides) -> dict:
    values = dict(policy=str(tiny_lm_dir), reward_model=str(rm_dir), prompts=str(prompts_file), out_dir=str(out_dir),
                  steps=3, batch_size=4, samples_per_prompt=2, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8,
                  lr=1e-3, precision="fp32", device="cpu", tensorboard=False, checkpoint_every=0)
    values.update(overrides)
    return values


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_critic_free_methods_train_the_policy_alone(algorithm, tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    cfg = PPOConfig(**settings(tiny_lm_dir, rm_dir, prompts_file, tmp_path / algorithm, algorithm=algorithm))
    trainer = PPOTrainer(cfg)
    assert trainer.models.critic is None and trainer.models.value_head is None  # one model copy fewer than PPO
    policy_params = {id(p) for p in trainer.models.policy.parameters()}
    assert all(id(p) in policy_params for g in trainer.optimizer.param_groups for p in g["params"])
    before = {k: v.clone() for k, v in trainer.models.policy.state_dict().items()}
    summary = trainer.train()
    out = tmp_path / algorithm
    assert summary["steps"] == 3 and not (out / "critic").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("vf_loss" not in r and "value_mean" not in r and "pg_loss" in r for r in rows)
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the policy moved


def test_group_advantages_are_one_per_response_and_centred_within_each_prompt(tiny_lm_dir, rm_dir, prompts_file,
                                                                               tmp_path):
    for algorithm in ("grpo", "rloo"):
        cfg = PPOConfig(**settings(tiny_lm_dir, rm_dir, prompts_file, tmp_path / algorithm, algorithm=algorithm,
                                   batch_size=8, samples_per_prompt=4, mini_batch_size=4))
        exp = PPOTrainer(cfg).rollout(0)
        per_response = (exp.advantages * exp.mask).sum(1) / exp.mask.sum(1)
        # every token of a response carries its response's advantage
        assert torch.allclose(exp.advantages, per_response[:, None] * exp.mask, atol=1e-6)
        # each prompt's four responses: advantages sum to 0 (GRPO by centring, RLOO by K/(K-1) * centring)
        assert torch.allclose(per_response.view(2, 4).sum(1), torch.zeros(2), atol=1e-4)
        total = (exp.rewards * exp.mask).sum(1).view(2, 4)  # score - beta * KL of each response
        if algorithm == "rloo":
            expected = (total - (total.sum(1, keepdim=True) - total) / 3).reshape(-1)
            assert torch.allclose(per_response, expected, atol=1e-5)


def test_reinforce_pp_whitens_returns_to_go_over_the_whole_batch(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    cfg = PPOConfig(**settings(tiny_lm_dir, rm_dir, prompts_file, tmp_path, algorithm="reinforce_pp"))
    exp = PPOTrainer(cfg).rollout(0)
    adv = exp.advantages[exp.mask > 0]
    assert abs(float(adv.mean())) < 1e-5 and abs(float(adv.std()) - 1.0) < 1e-3
    # the first token's return includes the whole score, so it follows the score's order
    assert torch.equal(exp.advantages[:, 0].argsort(), ((exp.rewards * exp.mask).sum(1)).argsort())


def test_each_algorithm_refuses_settings_it_cannot_honour(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    base = settings(tiny_lm_dir, rm_dir, prompts_file, tmp_path)
    cases = [
        (dict(algorithm="grpo", samples_per_prompt=1, batch_size=4), "samples_per_prompt must be >= 2"),
        (dict(algorithm="rloo", critic="separate"), "has no critic"),
        (dict(algorithm="reinforce_pp", critic_warmup_steps=1), "has no critic"),
        (dict(algorithm="ppo", critic="none"), "learns a critic"),
        (dict(algorithm="dpo"), "algorithm must be one of ppo, grpo, rloo, reinforce_pp"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            PPOConfig(**{**base, **overrides})


def run_ppo(config_file, wait: bool = True) -> subprocess.Popen:
    proc = alignloop("ppo", "--config", str(config_file))  # one thread: the same sums in every process
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_killed_at_a_random_step_resumes_bit_identically(algorithm, tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    """SIGKILL of a real process at a random moment after step 1; the rerun equals a run never stopped."""
    def config_file(name: str):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(settings(tiny_lm_dir, rm_dir, prompts_file, tmp_path / name,
                                                algorithm=algorithm, steps=5, checkpoint_every=1)))
        return path

    run_ppo(config_file("whole"))
    killed = config_file("killed")
    proc = run_ppo(killed, wait=False)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    kill_after = random.Random(algorithm).randint(1, 3)  # steps logged before the kill
    deadline = time.time() + 300
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < kill_after:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the run logged no step"
        time.sleep(0.01)
    time.sleep(random.Random(algorithm).uniform(0.0, 0.3))  # anywhere inside the next step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_ppo(killed)
    whole, resumed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "killed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    lines = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("whole", "killed")]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]  # noqa: E731
    assert strip(lines[0]) == strip(lines[1])


def test_with_no_kl_term_the_reference_is_neither_loaded_nor_run(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    """beta 0, no KL loss, no target (TRL's GRPO default): one model copy fewer, and no KL reported as if measured."""
    cfg = PPOConfig(**settings(tiny_lm_dir, rm_dir, prompts_file, tmp_path, algorithm="grpo", kl_coef=0.0,
                               target_kl=None, steps=2))
    trainer = PPOTrainer(cfg)
    assert not cfg.uses_reference and trainer.models.reference is None
    exp = trainer.rollout(0)
    assert exp.ref_logprobs is None and torch.equal(exp.kl, torch.zeros_like(exp.kl))
    summary = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and summary["final_kl_mean"] is None and all("kl_mean" not in r for r in rows)
    # any KL term brings the reference back
    for overrides in (dict(kl_coef=0.01), dict(kl_loss_coef=0.01), dict(target_kl=3.0, kl_coef=0.0)):
        assert PPOConfig(**{**settings(tiny_lm_dir, rm_dir, prompts_file, tmp_path, algorithm="grpo", kl_coef=0.0,
                                       target_kl=None), **overrides}).uses_reference
