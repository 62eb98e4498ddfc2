"""DPO and IPO: the losses by hand, the packed log-probs against a plain forward, training, resume, config, CLI."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignloop.dpo.losses import dpo_loss, ipo_loss, reward_accuracy
from alignloop.reward.data import Preference
from test_reward_train import sentiment_pairs, write_jsonl

T = lambda *x: torch.tensor(x, dtype=torch.float32)  # noqa: E731


# -- the losses, by hand -------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    # Log-ratios: chosen -10 - (-11) = +1, rejected -12 - (-11) = -1, so x = 2 and β·x = 0.2:
    # -log σ(0.2) = log(1 + e^-0.2) = 0.5981389; the implicit rewards are β·(±1) = ±0.1.
    out = dpo_loss(T(-10.0), T(-12.0), T(-11.0), T(-11.0), beta=0.1)
    assert out.loss.item() == pytest.approx(0.5981389, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.1))
    # Conservative DPO, ε = 0.1: 0.9·log(1 + e^-0.2) + 0.1·log(1 + e^0.2) = 0.5383250 + 0.0798139.
    smoothed = dpo_loss(T(-10.0), T(-12.0), T(-11.0), T(-11.0), beta=0.1, label_smoothing=0.1)
    assert smoothed.loss.item() == pytest.approx(0.6181389, abs=1e-6)
    # Policy = reference: ln 2 for every pair; a huge wrong margin stays finite (softplus, not log σ).
    assert dpo_loss(T(-3.0, -7.0), T(-5.0, -1.0), T(-3.0, -7.0), T(-5.0, -1.0), 0.5).loss.tolist() == \
        pytest.approx([math.log(2)] * 2)
    assert dpo_loss(T(-1000.0), T(0.0), T(0.0), T(0.0), beta=1.0).loss.item() == pytest.approx(1000.0)


def test_ipo_loss_by_hand():
    # Per-token log-ratios: chosen (-10 + 11) / 2 = 0.5, rejected (-12 + 11) / 4 = -0.25, h = 0.75;
    # target 1 / (2·0.1) = 5, so (0.75 - 5)^2 = 18.0625. The rewards are DPO's, on the sums.
    out = ipo_loss(T(-10.0), T(-12.0), T(-11.0), T(-11.0), beta=0.1, chosen_tokens=T(2), rejected_tokens=T(4))
    assert out.loss.item() == pytest.approx(18.0625)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.1, -0.1))
    # At the target the loss is 0, and past it the square pulls back (IPO does not push to infinity).
    at = ipo_loss(T(5.0), T(0.0), T(0.0), T(0.0), beta=0.1, chosen_tokens=T(1), rejected_tokens=T(1))
    past = ipo_loss(T(9.0), T(0.0), T(0.0), T(0.0), beta=0.1, chosen_tokens=T(1), rejected_tokens=T(1))
    assert at.loss.item() == 0.0 and past.loss.item() == pytest.approx(16.0)


def test_reward_accuracy_counts_a_tie_half():
    assert reward_accuracy(T(1.0, 0.0, -1.0, 0.0), T(0.0, 0.0, 2.0, -3.0)).item() == 2.5


def test_every_ranked_pair_of_a_ranking_is_a_pair_and_ties_give_none():
    from alignloop.dpo.train import ranked_pairs

    pairs = ranked_pairs([Preference("p", ["a", "b", "c"], [0, 1, 0]), Preference("q", ["x", "y"], [0, 1])])
    assert [(p.prompt, *p.responses) for p in pairs] == [("p", "a", "b"), ("p", "c", "b"), ("q", "x", "y")]
    assert all(p.ranks == [0, 1] for p in pairs)


def test_packed_pairs_give_the_log_probs_of_a_plain_forward(tiny_lm_dir):
    """Prompt once + chosen + rejected in shared-prefix rows = each response scored alone (alignloop.logprobs)."""
    from alignloop.dpo.train import collate_pairs, packing_works, sequence_logprobs
    from alignloop.logprobs import response_logprobs
    from alignloop.modeling import load_causal_lm, load_tokenizer
    from alignloop.reward.train import encode_items

    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir, "cpu", tok)
    items = [Preference("Life is", [" good and kind.", " bad."], [0, 1]),
             Preference("A fool and his money", [" are soon parted.", " stay."], [0, 1]),
             Preference("Never", [" again.", " say never, or always say it twice over"], [0, 1])]
    pairs, dropped = encode_items(tok, items, 96)
    assert dropped == 0 and packing_works(model, tok.pad_token_id, torch.device("cpu"))
    prompts = [it.seqs[0][:it.prompt_len] for it in pairs for _ in it.seqs]
    responses = [s[it.prompt_len:] for it in pairs for s in it.seqs]
    expected = torch.stack([lp.sum() for lp in response_logprobs(model, prompts, responses, tok.pad_token_id)])
    with torch.no_grad():
        for width in (0, 16, 64):  # padded; packed one pair per row (width < a pair); several pairs per row
            batch = collate_pairs(pairs, tok.pad_token_id, torch.device("cpu"), pack_width=width)
            assert torch.allclose(sequence_logprobs(model, batch, "fp32"), expected, atol=1e-5), width
            assert batch.lengths.tolist() == [len(r) for r in responses]
    assert collate_pairs(pairs, tok.pad_token_id, torch.device("cpu"), 64).input_ids.shape[0] < len(pairs)


# -- training end to end, through the CLI -------------------------------------------------------------------

def dpo_config(model: Path, data: Path, out_dir: Path, **overrides) -> dict:
    return {"model": str(model), "data": str(data), "out_dir": str(out_dir), "batch_size": 8, "epochs": 2,
            "lr": 1e-3, "max_length": 96, "eval_every": 10, "checkpoint_every": 10, "precision": "fp32",
            "device": "cpu", **overrides}


def run_cli(monkeypatch, *args: str) -> int:
    from alignloop import cli

    monkeypatch.setattr(sys, "argv", ["alignloop", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code or 0


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, fortunes) -> Path:
    rows = sentiment_pairs(fortunes, 160, 0) + [
        {"prompt": "x", "chosen": "same", "rejected": "same"},  # rejected and counted
        {"prompt": "Today", "responses": [" a good day", " a bad day", " a sad day"], "ranking": [0, [1, 2]]},
    ]
    return write_jsonl(tmp_path_factory.mktemp("dpo_data") / "prefs.jsonl", rows)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_lm_dir, data_file) -> tuple[dict, Path]:
    """One uninterrupted run through `alignloop dpo --config FILE`: its summary and config."""
    tmp = tmp_path_factory.mktemp("dpo_whole")
    config = tmp / "dpo.yaml"
    config.write_text(yaml.safe_dump(dpo_config(tiny_lm_dir, data_file, tmp / "out")))
    with pytest.MonkeyPatch.context() as mp:
        assert run_cli(mp, "dpo", "--config", str(config)) == 0
    return json.loads((tmp / "out" / "dpo_summary.json").read_text()), config


def test_training_raises_the_reward_accuracy_and_writes_a_plain_hf_directory(whole):
    from transformers import AutoModelForCausalLM

    summary, _ = whole
    assert summary["data"]["train"]["rejected_by_reason"] == {"chosen == rejected": 1}
    # 160 pairs + the ranking's 2 ranked pairs (its tie gives none), less the held-out prompts' pairs.
    assert summary["data"]["train_pairs"] + summary["data"]["held_out_pairs"] == 162
    assert summary["steps"] == math.ceil(summary["data"]["train_pairs"] * 2 / 8)
    # Step 1: policy = reference, so every implicit reward is 0 (to rounding: the reference pass batched
    # the pairs otherwise) and the loss ln 2.
    assert summary["first_train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["final_train_reward_accuracy"] >= 0.9 and summary["final_train_loss"] < 0.5, summary
    assert summary["final_train_reward_margin"] > 0.5
    assert summary["held_out_reward_accuracy"] >= 0.75 and summary["held_out_loss"] < math.log(2), summary
    assert summary["held_out_reward_chosen"] > summary["held_out_reward_rejected"]
    assert summary["packed"] and summary["padding_fraction"] < 0.2

    out = Path(summary["out_dir"])
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain HF directory, with its tokenizer
    assert (out / "tokenizer.json").is_file() and model.config.pad_token_id is not None
    assert not (out / "checkpoint").exists() and (out / "alignloop_dpoconfig.yaml").is_file()
    assert any((out / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))
    assert {"loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "lr"} <= rows[0].keys()
    assert abs(rows[0]["reward_chosen"]) < 1e-5 and abs(rows[0]["reward_rejected"]) < 1e-5
    evaluated = [r["step"] for r in rows if "eval_reward_accuracy" in r]
    assert evaluated == [*range(10, summary["steps"], 10), summary["steps"]]
    assert rows[-1]["eval_reward_accuracy"] == summary["held_out_reward_accuracy"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_killed_run_resumes_to_the_same_model(tiny_lm_dir, data_file, tmp_path, capfd, precision):
    """SIGKILL right after the first checkpoint, then rerun: the same model and figures as a run never stopped."""
    from alignloop.dpo import DPOConfig, train_dpo

    values = dpo_config(tiny_lm_dir, data_file, tmp_path / "whole", epochs=1, precision=precision)
    whole = train_dpo(DPOConfig(**values))
    values["out_dir"] = str(tmp_path / "killed")

    # A fresh process (not a fork: a forked child of a process whose OpenMP pool is running can hang)
    # that dies by SIGKILL the moment its first checkpoint is on disk.
    script = f"""
import os, signal
from alignloop.checkpoint import Checkpointer
from alignloop.dpo import DPOConfig, train_dpo
save = Checkpointer.save
def save_then_die(self, state):
    save(self, state)
    os.kill(os.getpid(), signal.SIGKILL)
Checkpointer.save = save_then_die
train_dpo(DPOConfig(**{values!r}))
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint" / "state.pt").is_file()
    capfd.readouterr()
    resumed = train_dpo(DPOConfig(**values))
    assert "resuming from" in capfd.readouterr().err
    assert resumed["resumed_from_step"] == 10 and whole["steps"] > 10

    a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "whole", tmp_path / "killed"))
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    timing = {"seconds", "seconds_reference", "seconds_train", "seconds_eval", "pairs_per_second", "fingerprint",
              "out_dir", "resumed_from_step"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    metrics = [(d / "metrics.jsonl").read_text() for d in (tmp_path / "whole", tmp_path / "killed")]
    assert metrics[0] == metrics[1]  # every step once, with the same figures


def test_ipo_pulls_the_log_ratio_gap_towards_its_target(tiny_lm_dir, data_file, tmp_path):
    from alignloop.dpo import DPOConfig, train_dpo

    values = dpo_config(tiny_lm_dir, data_file, tmp_path / "ipo", loss="ipo", beta=0.5, eval_every=0,
                        checkpoint_every=0, tensorboard=False)
    summary = train_dpo(DPOConfig(**values))
    assert summary["first_train_loss"] == pytest.approx(1.0, abs=1e-5)  # (0 - 1/(2·0.5))^2 at the reference
    summary_line = {k: summary[k] for k in ("final_train_loss", "held_out_reward_accuracy", "held_out_loss")}
    assert summary["final_train_loss"] < 0.5 and summary["held_out_reward_accuracy"] >= 0.75, summary_line


@pytest.mark.parametrize("override, message", [
    ("beta=0", "beta must be > 0"),
    ("loss=kto", "loss must be one of dpo, ipo"),
    ("label_smoothing=0.5", "label_smoothing is the probability a label is flipped"),
    ("eval_every=-1", "checkpoint_every and eval_every must be >= 0"),
])
def test_a_bad_config_value_is_refused_in_one_line(whole, monkeypatch, capsys, override, message):
    _, config_file = whole
    assert run_cli(monkeypatch, "dpo", "--config", str(config_file), "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ") and "Traceback" not in err


def test_label_smoothing_needs_dpo_and_an_unknown_key_names_its_line(whole, tmp_path, monkeypatch, capsys):
    _, config_file = whole
    assert run_cli(monkeypatch, "dpo", "--config", str(config_file), "--set", "loss=ipo",
                   "--set", "label_smoothing=0.1") == 2
    assert "use it with loss: dpo" in capsys.readouterr().err.replace("\n", " ")
    bad = tmp_path / "bad.yaml"
    bad.write_text(config_file.read_text() + "bta: 0.2\n")
    assert run_cli(monkeypatch, "dpo", "--config", str(bad)) == 2
    lines = len(config_file.read_text().splitlines()) + 1
    assert f"bad.yaml:{lines}: field 'bta': unknown key for DPOConfig" in capsys.readouterr().err.replace("\n", "")
