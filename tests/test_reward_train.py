"""Reward model end to end on a tiny GPT-2: train, save, load, normalise, evaluate, score, CLI."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # trains a (tiny) model for ~15-30 s on 2 shared cores

POSITIVE = ["love", "great", "happy", "wonderful", "good", "joy", "best", "beautiful"]
NEGATIVE = ["hate", "awful", "sad", "terrible", "bad", "pain", "worst", "ugly"]


def sentiment_pairs(fortunes: list[str], n: int, seed: int) -> list[dict]:
    """Corpus snippets with one sentiment word inserted: the positive one is preferred."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choice(fortunes).split()[:8]
        other = rng.choice(fortunes).split()[:8]
        pos, neg = " " + " ".join(words + [rng.choice(POSITIVE)]), " " + " ".join(other + [rng.choice(NEGATIVE)])
        rows.append({"prompt": " ".join(rng.choice(fortunes).split()[:3]), "chosen": pos, "rejected": neg})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lm_dir, fortunes):
    from alignloop.reward.train import RewardTrainConfig, train_reward_model

    tmp = tmp_path_factory.mktemp("rm")
    train = write_jsonl(tmp / "train.jsonl", sentiment_pairs(fortunes, 256, 0) + [
        {"prompt": "x", "chosen": "same", "rejected": "same"},  # rejected and counted, not dropped silently
        {"prompt": "x", "responses": [" good day", " bad day", " sad day"], "ranking": [0, [1, 2]]},
    ])
    held = write_jsonl(tmp / "held.jsonl", sentiment_pairs(fortunes, 96, 1))
    config = RewardTrainConfig(model=tiny_lm_dir, data=train, held_out_data=held, out_dir=tmp / "rm",
                               epochs=2, batch_size=16, gradient_accumulation_steps=2, lr=3e-3, max_length=96,
                               checkpoint_every=10, normalize_samples=64, precision="fp32", device="cpu")
    return config, train_reward_model(config), held


def test_training_learns_a_held_out_preference(trained):
    config, summary, _ = trained
    assert summary["data"]["train"]["rejected_by_reason"] == {"chosen == rejected": 1}
    assert summary["data"]["train"]["rankings"] == 1
    assert summary["steps"] == 17  # ceil(257 items * 2 epochs / (16 * 2))
    assert summary["held_out_accuracy"] >= 0.8, summary
    assert summary["held_out_loss"] < 0.6931  # better than chance (ln 2)
    assert summary["padding_fraction"] < 0.35


def test_output_loads_as_hf_sequence_classifier_and_reward_model(trained):
    from transformers import AutoModelForSequenceClassification

    from alignloop.reward.model import NORMALIZATION_FILE, RewardModel

    config, summary, _ = trained
    out = Path(config.out_dir)
    assert (out / "reward_summary.json").is_file() and (out / NORMALIZATION_FILE).is_file()
    assert not (out / "checkpoint").exists()  # a finished run leaves no mid-run state behind
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id is not None
    assert all(v == 0.0 for k, v in hf.config.to_dict().items() if "pdrop" in k)
    rm = RewardModel.from_pretrained(out, "cpu", "fp32")
    assert (rm.gain, rm.bias) == pytest.approx((summary["normalization"]["gain"], summary["normalization"]["bias"]))
    ids = torch.tensor([[5, 6, 7, rm.tokenizer.eos_token_id]])
    raw = hf(input_ids=ids).logits[0, 0].item()
    assert rm.score_ids(ids, torch.ones_like(ids)).item() == pytest.approx(rm.gain * raw + rm.bias, abs=1e-4)


def test_normalised_scores_of_reference_responses_have_mean_0_std_1(trained):
    from alignloop.reward.data import read_preferences
    from alignloop.reward.model import RewardModel
    from alignloop.reward.train import reference_responses

    config, _, _ = trained
    rm = RewardModel.from_pretrained(config.out_dir)
    items = read_preferences(config.data).items
    prompts, responses, _ = reference_responses(config, rm.tokenizer, torch.device("cpu"), "fp32", items)
    scores = torch.tensor(rm.score(prompts, responses))
    assert scores.mean().item() == pytest.approx(0, abs=1e-3) and scores.std().item() == pytest.approx(1, abs=1e-3)


def test_eval_reports_accuracy_calibration_png(trained, tmp_path):
    from alignloop.reward.evaluate import RewardEvalConfig, evaluate_reward_model

    config, summary, held = trained
    result = evaluate_reward_model(RewardEvalConfig(reward_model=config.out_dir, data=held, out_dir=tmp_path,
                                                    bins=5, device="cpu", precision="fp32"))
    assert result["accuracy"] == pytest.approx(summary["held_out_accuracy"])
    assert result["loss"] == pytest.approx(summary["held_out_loss"], rel=1e-4)
    assert result["mean_margin"] > 0
    assert sum(b["count"] for b in result["calibration"]["bins"]) == result["comparisons"] == 96
    assert (tmp_path / "calibration.png").stat().st_size > 1000


def test_cli_score_and_one_line_errors(trained, tmp_path, monkeypatch, capsys):
    from alignloop import cli

    config, _, _ = trained
    rows = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Life", "completion": " is good"},
                                                {"prompt": "Life", "completion": " is bad"}])
    monkeypatch.setattr(sys, "argv", ["alignloop", "reward", "score", "--reward-model", str(config.out_dir),
                                      "--data", str(rows), "--out", str(tmp_path / "scored.jsonl"), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code in (0, None)
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in scored] == [" is good", " is bad"] and all("reward" in r for r in scored)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": 7}\n')
    monkeypatch.setattr(sys, "argv", ["alignloop", "reward", "train", "--model", str(config.model),
                                      "--data", str(bad), "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: field 'rejected': expected str or list of messages, got int" in err.replace("\n", "")
    assert "Traceback" not in err
