"""`alignloop compare` end to end on tiny models: every run trained and judged on the same prompts, reused on rerun."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignloop.compare import CompareConfig, compare, winners, frontier
from alignloop.errors import ConfigError
from alignloop.modeling import load_tokenizer
from alignloop.reward.model import RewardModel, init_reward_model


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_lm_dir, fortunes):
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    RewardModel(init_reward_model(tiny_lm_dir), load_tokenizer(tiny_lm_dir)).save_pretrained(root / "rm")
    for name, chunk in (("train", fortunes[:40]), ("held", fortunes[40:52])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": " ".join(d.split()[:4])}) + "\n"
                                                    for d in chunk))
    (root / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": " ".join(d.split()[:4]), "chosen": " good and kind", "rejected": " bad and cruel"}) + "\n"
        for d in fortunes[:48]))
    return dict(sft=tiny_lm_dir, reward_model=root / "rm", prompts=root / "train.jsonl", preferences=root / "prefs.jsonl",
                dpo={"batch_size": 8, "precision": "fp32", "device": "cpu", "checkpoint_every": 0},
                held_out_prompts=root / "held.jsonl", num_prompts=12,
                online=dict(steps=2, batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8,
                            precision="fp32", device="cpu", checkpoint_every=0),
                per_method={"grpo": {"samples_per_prompt": 2}})


@pytest.mark.slow
def test_compare_runs_each_method_at_each_budget_and_reuses_them(setting, tmp_path):
    cfg = CompareConfig(**setting, out_dir=tmp_path / "cmp", methods=["ppo", "grpo", "dpo", "best_of_n"],
                        kl_budgets=[1.0, 50.0], dpo_betas=[0.1], best_of_n=[1, 4])
    result = compare(cfg)
    rows = result["runs"]
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("ppo", "kl1"), ("ppo", "kl50"), ("grpo", "kl1"), ("grpo", "kl50"), ("dpo", "beta0.1"), ("best_of_n", "n1"),
        ("best_of_n", "n4")]
    trained = [r for r in rows if r["method"] != "best_of_n"]
    assert all(r["train_seconds"] > 0 and r["peak_rss_mb"] > 50 for r in trained)  # each its own process
    # DPO moved the policy away from the SFT model (its KL estimate, over 12 prompts, may fall either side of 0)
    dpo_weights = load_file(str(tmp_path / "cmp" / "dpo" / "beta0.1" / "seed0" / "model" / "model.safetensors"))
    sft_weights = load_file(str(setting["sft"] / "model.safetensors"))
    assert max(float((dpo_weights[k] - sft_weights[k]).abs().max()) for k in sft_weights) > 1e-4
    assert abs(rows[4]["kl"]) < 10
    bon1 = rows[5]
    assert bon1["kl"] == pytest.approx(0.0, abs=1e-5) and bon1["judge_win"] == 0.5  # N = 1 is the SFT model
    assert rows[6]["rm_win"] > 0.5  # the RM-best of 4 beats a single sample by that RM
    out = tmp_path / "cmp"
    assert (out / "compare.html").is_file() and (out / "plots" / "judge_win_vs_kl.png").is_file()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["winners"] == result["winners"] and {w["kl_budget"] for w in saved["winners"]} <= {1.0, 50.0}
    assert all(w["trained"] is None or w["trained"]["best"] != "best_of_n" for w in saved["winners"])
    html = (out / "compare.html").read_text()
    assert "grpo (kl50)" in html and "best_of_n (n4)" in html  # the side-by-side completions
    assert (out / "ppo" / "kl1" / "seed0" / "model" / "critic").is_dir()
    assert not (out / "grpo" / "kl1" / "seed0" / "model" / "critic").exists()  # critic-free: no critic saved

    again = compare(cfg)  # nothing to train or judge again: every stage summary matches its config
    assert [r["train_seconds"] for r in again["runs"] if "train_seconds" in r] == \
        [r["train_seconds"] for r in trained]
    assert again["seconds"] < result["seconds"] / 3


def test_winner_per_budget_is_paired_over_the_same_prompts(setting, tmp_path):
    """Hand-made evaluations: A beats the SFT on 3 of 4 prompts, B on 1 of 4, both within the budget."""
    cfg = CompareConfig(**{**setting, "out_dir": tmp_path, "methods": ["ppo", "rloo"], "kl_budgets": [2.0],
                           "per_method": {"rloo": {"samples_per_prompt": 2}}})
    runs = cfg.runs()
    rows = []
    for run, wins, kl in ((runs[0], [1, 1, 1, 0], 1.5), (runs[1], [1, 0, 0, 0], 2.4)):
        (run.dir / "eval").mkdir(parents=True)
        (run.dir / "eval" / "samples.jsonl").write_text("".join(
            json.dumps({"prompt": str(i), "sft": "", "policy": "", "sft_judge": 0.5, "policy_judge": float(w)}) + "\n"
            for i, w in enumerate(wins)))
        rows.append({"kl": kl, "judge_win": sum(wins) / 4, "rm_win": 0.5})
    fronts = frontier(cfg, runs, rows)
    assert fronts["ppo"][0]["judge_win"] == 0.75 and fronts["rloo"][0]["judge_win"] == 0.25
    (entry,) = winners(cfg, runs, fronts)
    table = entry["overall"]
    assert entry["trained"] == table  # no best-of-N here: the two rankings agree
    # per prompt A - B: 0, 1, 1, 0 -> margin 0.5, stderr stdev([0,1,1,0]) / 2 = 0.57735 / 2
    assert table["best"] == "ppo" and table["runner_up"] == "rloo" and table["paired_items"] == 4
    assert table["margin"] == pytest.approx(0.5) and table["margin_stderr"] == pytest.approx(0.5773503 / 2)
    # a KL of 2.6 is past 1.25 x 2: that point would not count at this budget
    rows[1]["kl"] = 2.6
    (entry,) = winners(cfg, runs, frontier(cfg, runs, rows))
    assert "runner_up" not in entry["overall"]


def test_compare_refuses_what_it_cannot_run(setting, tmp_path):
    cases = [(dict(methods=["ppo", "sft"]), "unknown method"), (dict(kl_budgets=[0]), "kl_budgets"),
             (dict(best_of_n=[0]), "best_of_n"), (dict(seeds=[]), "seeds"),
             (dict(methods=["grpo"], per_method={"grpo": {"samples_per_prompt": 1}}), "samples_per_prompt must be >= 2"),
             (dict(methods=["dpo"], preferences=tmp_path / "none.jsonl"), "preferences")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            CompareConfig(**{**setting, "out_dir": tmp_path, **overrides})
