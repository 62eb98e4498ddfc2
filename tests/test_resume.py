"""Training stages killed mid-run (SIGKILL, a real process) resume from their checkpoint and end as if never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}  # one thread: the same sums in every process


def alignloop(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignloop", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_after_first_checkpoint(args: list[str], checkpoint: Path, timeout: float = 240.0) -> None:
    proc = alignloop(*args)
    deadline = time.time() + timeout
    while not (checkpoint / "state.pt").is_file():
        assert proc.poll() is None, f"finished before its first checkpoint: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(args: list[str], summary: Path, resumes: bool = False) -> dict:
    proc = alignloop(*args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert ("resuming from" in err) == resumes, err[-3000:]  # it really took up the killed run's state
    return json.loads(summary.read_text())


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, fortunes) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(fortunes[:800]) + "\n")
    return path


@pytest.mark.slow
def test_pretrain_killed_mid_run_resumes_to_the_same_model(corpus, tmp_path):
    sets = ["--set", "vocab_size=320", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
            "--set", "block_size=32", "--set", "batch_size=8", "--set", "epochs=0.5", "--set", "warmup_steps=2",
            "--set", "checkpoint_every=3", "--set", "precision=fp32", "--set", "device=cpu"]
    whole = finish(["pretrain", "--corpus", str(corpus), "--out-dir", str(tmp_path / "whole"), *sets],
                   tmp_path / "whole" / "pretrain_summary.json")
    killed = tmp_path / "killed"
    args = ["pretrain", "--corpus", str(corpus), "--out-dir", str(killed), *sets]
    kill_after_first_checkpoint(args, killed / "checkpoint")
    resumed = finish(args, killed / "pretrain_summary.json", resumes=True)
    assert resumed["steps"] == whole["steps"] > 3
    assert same_weights(tmp_path / "whole", killed)
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    assert not (killed / "checkpoint").exists()  # the finished run cleans up its mid-run state


@pytest.mark.slow
def test_reward_training_killed_mid_run_resumes_to_the_same_model(tiny_lm_dir, fortunes, tmp_path):
    from test_reward_train import sentiment_pairs, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(fortunes, 400, 0))
    held = write_jsonl(tmp_path / "held.jsonl", sentiment_pairs(fortunes, 32, 1))
    sets = ["--set", "batch_size=8", "--set", "epochs=1", "--set", "max_length=96", "--set", "normalize_samples=16",
            "--set", "checkpoint_every=4", "--set", "precision=fp32", "--set", "device=cpu"]

    def args(out: Path) -> list[str]:
        return ["reward", "train", "--model", str(tiny_lm_dir), "--data", str(data), "--held-out-data", str(held),
                "--out-dir", str(out), *sets]

    whole = finish(args(tmp_path / "whole"), tmp_path / "whole" / "reward_summary.json")
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(args(killed), killed / "checkpoint")
    resumed = finish(args(killed), killed / "reward_summary.json", resumes=True)
    assert same_weights(tmp_path / "whole", killed)
    for key in ("steps", "final_train_loss", "train_accuracy", "held_out_accuracy", "normalization"):
        assert resumed[key] == whole[key], key


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path):
    from alignloop.checkpoint import Checkpointer

    notes: list[str] = []
    Checkpointer(tmp_path / "checkpoint", "config-a", every=1).save({"step": 3})
    assert Checkpointer(tmp_path / "checkpoint", "config-a", every=1).load()["step"] == 3
    assert Checkpointer(tmp_path / "checkpoint", "config-b", every=1, log=notes.append).load() is None
    assert notes and "another config" in notes[0]
