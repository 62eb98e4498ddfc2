"""grpo_vs_trl.py / rloo_vs_trl.py: the FLOP count, where each side puts beta, and that both sides pay the same reward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from critic_free_bench import (Settings, alignloop_config, batch_mean_se, critic_free_flops_per_episode,  # noqa: E402
                               load_inputs, parse_betas, run_alignloop)
from grpo_vs_trl import GRPO  # noqa: E402
from rloo_vs_trl import RLOO  # noqa: E402

from alignloop.jsonl import write_jsonl  # noqa: E402
from alignloop.modeling import load_tokenizer  # noqa: E402
from alignloop.prompts import encode_prompt  # noqa: E402
from alignloop.reward.model import RewardModel, init_reward_model  # noqa: E402
from alignloop.rollout import batch_from_lists, scalar_head_outputs, sequence_scores  # noqa: E402

TRL_PYTHON = BENCH.parent / ".venv-trl116" / "bin" / "python"


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory, tiny_lm_dir) -> dict:
    """A tiny SFT directory with training prompts and a reward model with a non-trivial normalisation."""
    root = tmp_path_factory.mktemp("critic_free")
    torch.manual_seed(0)  # the fresh scalar head
    rm_dir = RewardModel(init_reward_model(tiny_lm_dir), load_tokenizer(tiny_lm_dir), gain=2.0,
                         bias=0.5).save_pretrained(root / "reward_model")
    prompts = root / "train_prompts.jsonl"
    write_jsonl(prompts, ({"prompt": p} for p in ["A fool and", "The early bird", "A fool and", "Never trust"]))
    return {"sft": tiny_lm_dir, "reward_model": rm_dir, "prompts": prompts, "work": root / "work"}


def test_flops_per_episode_hand_computed():
    # policy N=10, RM N=4; 2 prompt + 3 response tokens (T=5).
    with_ref = critic_free_flops_per_episode(10, 4, prompt_tokens=2, response_tokens=3, with_reference=True)
    assert with_ref["generation"] == 2 * 10 * 5  # one forward per token with a KV cache
    assert with_ref["scoring"] == 2 * (4 + 10) * 5  # the RM and the reference
    assert with_ref["update"] == 6 * 10 * 5  # one forward+backward of the policy, no critic
    assert with_ref["total"] == 100 + 140 + 300
    no_ref = critic_free_flops_per_episode(10, 4, prompt_tokens=2, response_tokens=3, with_reference=False)
    assert no_ref["scoring"] == 2 * 4 * 5 and no_ref["total"] == 100 + 40 + 300  # beta 0: TRL loads no reference


def test_beta_goes_where_trl_puts_it():
    assert GRPO.alignloop_config(0.05) == {"algorithm": "grpo", "kl_coef": 0.0, "kl_loss_coef": 0.05,
                                           "group_std_normalize": True, "loss_aggregation": "token_mean"}
    assert RLOO.alignloop_config(0.05) == {"algorithm": "rloo", "kl_coef": 0.05, "kl_loss_coef": 0.0,
                                           "kl_estimator": "k1", "loss_aggregation": "sequence_mean"}
    assert GRPO.alignloop_config(0.0)["kl_loss_coef"] == 0.0 and RLOO.alignloop_config(0.0)["kl_coef"] == 0.0


def test_final_reward_standard_error_is_over_batch_means():
    # batch means 1 and 3: mean 2, sample variance ((1-2)^2 + (3-2)^2) / 1 = 2, SE = sqrt(2 / 2) = 1
    assert batch_mean_se([1.0, 3.0]) == pytest.approx(1.0)
    assert batch_mean_se([0.0, 0.0, 0.0]) == 0.0
    assert batch_mean_se([0.5]) is None  # one batch: no spread to measure


def test_parse_betas():
    assert parse_betas("0.05,0") == [0.05, 0.0]
    with pytest.raises(Exception, match="betas >= 0"):
        parse_betas("-1")


def test_inputs_are_the_distinct_prompts_as_alignloop_tokenises_them(demo_like):
    inputs = load_inputs(demo_like["sft"], demo_like["reward_model"], demo_like["prompts"], 256, demo_like["work"])
    assert inputs["prompts"] == ["A fool and", "The early bird", "Never trust"]  # duplicates dropped, order kept
    tok = load_tokenizer(demo_like["sft"])
    assert inputs["prompt_ids"] == [encode_prompt(tok, p) for p in inputs["prompts"]]
    assert [json.loads(line)["prompt"] for line in inputs["prompts_file"].read_text().splitlines()] == inputs["prompts"]


def test_missing_demo_input_stops_with_one_line(demo_like, tmp_path):
    with pytest.raises(SystemExit, match="no SFT model at .*: run `make demo` first"):
        load_inputs(tmp_path / "nothing", demo_like["reward_model"], demo_like["prompts"], 8, tmp_path)


@pytest.mark.parametrize("method", [GRPO, RLOO], ids=["grpo", "rloo"])
def test_alignloop_side_runs_critic_free_in_the_benchmark_settings(method, demo_like):
    inputs = load_inputs(demo_like["sft"], demo_like["reward_model"], demo_like["prompts"], 256, demo_like["work"])
    settings = Settings(max_new_tokens=8)
    config = alignloop_config(method, inputs, settings, 0.05, "fp32", 3, demo_like["work"] / "cfg")
    assert config.critic_type == "none" and config.ppo_epochs == 1 and config.num_mini_batches == 1
    assert config.prompts_per_step == 2 and config.target_kl is None
    result = run_alignloop(method, inputs, settings, 0.05, "fp32", steps=2, warmup=1, final_steps=2,
                           work=demo_like["work"])
    assert len(result["score_per_step"]) == 3 and result["steps_timed"] == 2
    assert result["episodes_per_second"] == pytest.approx(8 * 2 / result["seconds_timed"])
    assert result["final_score_mean"] == pytest.approx(sum(result["score_per_step"][-2:]) / 2)
    assert not (demo_like["work"] / "alignloop-beta0.05-fp32" / "critic").exists()


@pytest.mark.skipif(not TRL_PYTHON.is_file(), reason="needs .venv-trl116 (benchmarks/setup_trl116_env.sh)")
def test_trl_reward_function_pays_alignloops_score(demo_like, tmp_path):
    """The TRL workers' reward function, run in the TRL venv, equals alignloop's RewardModel on the same ids."""
    tok = load_tokenizer(demo_like["sft"])
    prompts = ["A fool and", "The early bird"]
    prompt_ids = {p: encode_prompt(tok, p) for p in prompts}
    eos, pad = tok.eos_token_id, tok.pad_token_id
    body = tok("is soon parted", add_special_tokens=False)["input_ids"]
    completions = [body + [eos], body[:2]]  # one ended with EOS, one cut off (no EOS)
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"rm": str(demo_like["reward_model"]), "prompt_ids": prompt_ids, "eos": eos,
                                "pad": pad, "prompts": prompts, "completions": completions}))
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[2]); from _trl_critic_free import RewardModelScore\n"
        "c = json.load(open(sys.argv[1]))\n"
        "f = RewardModelScore(c['rm'], c['prompt_ids'], c['eos'], c['pad'], False, 0.7, 'sdpa')\n"
        "conv = [[{'role': 'user', 'content': p}] for p in c['prompts']]\n"
        "paid = f(prompts=conv, completions=None, completion_ids=c['completions'])\n"
        "print(json.dumps({'raw': f.calls[-1], 'paid': paid, 'finished': f.finished[-1]}))\n")
    proc = subprocess.run([str(TRL_PYTHON), "-c", script, str(case), str(BENCH)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    # What the PPO stage pays: the RM's head at each response's last token (left-padded prompts), normalised.
    rm = RewardModel.from_pretrained(demo_like["reward_model"])
    batch = batch_from_lists([prompt_ids[p] for p in prompts], completions, pad, torch.device("cpu"))
    with torch.no_grad():
        expected = rm.normalize(sequence_scores(scalar_head_outputs(rm.model, batch, "fp32"), batch)).tolist()
    assert out["raw"] == pytest.approx(expected, abs=1e-5)
    assert out["finished"] == [True, False]
    assert out["paid"] == pytest.approx([expected[0], expected[1] - 0.7], abs=1e-5)  # missing-EOS penalty 0.7
