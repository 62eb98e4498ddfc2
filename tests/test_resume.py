"""Stages killed (SIGKILL, a real process) at random moments and rerun end as if never stopped.

Training stages resume from their checkpoint; simulated annotation from its database, answer for
answer; sampling and evaluation, which have no mid-stage state, rerun whole, and their outputs are
written to a temporary name and renamed, so a kill never leaves half a file under the final name.
Model directories are swapped into place whole (`files.atomic_directory`).

A rerun is compared with an uninterrupted run of the same config *at the same path* (the finished
reference is moved aside first), so every file that names a path is comparable byte for byte; only
timings differ (TIMING_KEYS).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignloop.errors import InputError
from alignloop.files import atomic_directory
from alignloop.modeling import build_causal_lm, check_model_dir, load_tokenizer, save_model_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}  # one thread: the same sums in every process
# With progress bars: a test waits for a stage's "generate" bar to know its work has begun.
ENV_PROGRESS = {k: v for k, v in ENV.items() if k != "TQDM_DISABLE"}
# Measured durations, which no two runs share: in summaries, metrics rows and exported rankings; and the
# fingerprints that hash them (exported rankings, the reward model's data, carry each answer's measured time).
TIMING_KEYS = re.compile(r"(^|_)seconds(_|$)|per_second$|^new_answers$|^fingerprint$")


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


def as_sets(sets: list[str]) -> list[str]:
    return [a for item in sets for a in ("--set", item)]


@pytest.mark.slow
def test_pretrain_killed_mid_run_resumes_to_the_same_model(corpus, tmp_path, one_thread):
    from alignloop.pretrain import PretrainConfig, pretrain

    sets = ["vocab_size=320", "n_layer=1", "n_embd=32", "n_head=2", "block_size=32", "batch_size=8", "epochs=0.5",
            "warmup_steps=2", "checkpoint_every=3", "precision=fp32", "device=cpu"]
    out = tmp_path / "out"
    whole = pretrain(PretrainConfig.load(None, sets, corpus=str(corpus), out_dir=out))
    out.rename(tmp_path / "whole")
    args = ["pretrain", "--corpus", str(corpus), "--out-dir", str(out), *as_sets(sets)]
    kill_after_first_checkpoint(args, out / "checkpoint")
    resumed = finish(args, out / "pretrain_summary.json", resumes=True)
    assert resumed["steps"] == whole["steps"] > 3
    assert same_weights(tmp_path / "whole", out)
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    assert not (out / "checkpoint").exists()  # the finished run cleans up its mid-run state


@pytest.mark.slow
def test_reward_training_killed_mid_run_resumes_to_the_same_model(tiny_lm_dir, fortunes, tmp_path, one_thread):
    from alignloop.reward.train import RewardTrainConfig, train_reward_model
    from test_reward_train import sentiment_pairs, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(fortunes, 400, 0))
    held = write_jsonl(tmp_path / "held.jsonl", sentiment_pairs(fortunes, 32, 1))
    sets = ["batch_size=8", "epochs=1", "max_length=96", "normalize_samples=16", "checkpoint_every=4",
            "precision=fp32", "device=cpu"]
    out = tmp_path / "out"
    whole = train_reward_model(RewardTrainConfig.load(None, sets, model=tiny_lm_dir, data=data, held_out_data=held,
                                                      out_dir=out))
    out.rename(tmp_path / "whole")
    args = ["reward", "train", "--model", str(tiny_lm_dir), "--data", str(data), "--held-out-data", str(held),
            "--out-dir", str(out), *as_sets(sets)]
    kill_after_first_checkpoint(args, out / "checkpoint")
    resumed = finish(args, out / "reward_summary.json", resumes=True)
    assert same_weights(tmp_path / "whole", out)
    for key in ("steps", "final_train_loss", "train_accuracy", "held_out_accuracy", "normalization"):
        assert resumed[key] == whole[key], key


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path):
    from alignloop.checkpoint import Checkpointer

    notes: list[str] = []
    Checkpointer(tmp_path / "checkpoint", "config-a", every=1).save({"step": 3})
    assert Checkpointer(tmp_path / "checkpoint", "config-a", every=1).load()["step"] == 3
    assert Checkpointer(tmp_path / "checkpoint", "config-b", every=1, log=notes.append).load() is None
    assert notes and "another config" in notes[0]


# -- killed at random moments ------------------------------------------------------------------------

@pytest.fixture
def one_thread(monkeypatch):
    """In-process reference runs with the threads of the killed processes (OMP_NUM_THREADS=1): same sums."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Process:
    """A real `alignloop` process whose stderr is read as it comes, so a test can wait for a line in it."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "alignloop", *args], env=ENV_PROGRESS,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk.decode("utf-8", "replace")


Moment = tuple[Callable[[Process], bool], float]  # (has the work to interrupt begun?, seconds after that)


def random_moments(started: Callable[[Process], bool], work_seconds: float, kills: int, seed: int,
                   fractions: tuple[float, float] = (0.1, 0.9)) -> list[Moment]:
    """`kills` moments U(*fractions) x `work_seconds` (an uninterrupted run's measured work) after `started`.
    A command that resumes needs fractions summing below 1 over the kills, or a late kill finds it done."""
    rng = random.Random(seed)
    return [(started, rng.uniform(*fractions) * work_seconds) for _ in range(kills)]


def kill_at(args: list[str], moments: list[Moment], after_kill: Callable[[Process], Any]) -> list[Any]:
    """Start the command once per moment and SIGKILL it then (it must still be running). After each kill,
    `after_kill(run)` checks what the killed run left; its results are returned."""
    seen = []
    for started, delay in moments:
        run = Process(args)
        deadline = time.time() + 240
        while not started(run):
            assert run.proc.poll() is None, f"ended before its work began: {run.err[-2000:]}"
            assert time.time() < deadline, "its work never began"
            time.sleep(0.01)
        time.sleep(delay)
        assert run.proc.poll() is None, "finished before the kill: the moment is past the end of its work"
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait()
        seen.append(after_kill(run))
    return seen


def checkpointed_at(stage: str, checkpoint: Path, fraction: float) -> Callable[[Process], bool]:
    """Has `stage` run `fraction` of its steps (its progress bar's "n/total") with a checkpoint written?"""
    def reached(run: Process) -> bool:
        _, running, after = run.err.rpartition(f"{stage}: running")
        counts = re.findall(r"(\d+)/(\d+) \[", after)
        if not running or not counts or not (checkpoint / "state.pt").is_file():
            return False
        done, total = map(int, counts[-1])
        return done >= fraction * total
    return reached


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not TIMING_KEYS.search(str(k))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def same_outputs(reference: Path, rerun: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file of `reference` is in `rerun` with the same content, timings aside; returns the files compared."""
    compared = []
    for a in sorted(p for p in reference.rglob("*") if p.is_file()):
        name = str(a.relative_to(reference))
        if any(re.fullmatch(pattern, name) for pattern in skip):
            continue
        b = rerun / name
        assert b.is_file(), f"{name}: not written by the rerun"
        if a.suffix == ".json":
            assert without_timings(json.loads(a.read_text())) == without_timings(json.loads(b.read_text())), name
        elif a.suffix == ".jsonl":
            rows = [[without_timings(json.loads(line)) for line in f.read_text().splitlines()] for f in (a, b)]
            assert rows[0] == rows[1], name
        else:
            assert a.read_bytes() == b.read_bytes(), name
        compared.append(name)
    return compared


def no_half_files(out: Path) -> None:
    """What a killed run left under final names is whole: JSON parses, every JSONL line parses, every
    model directory with weights loads its weights and has its tokenizer."""
    for path in out.rglob("*"):
        if any(".tmp" in part for part in path.relative_to(out).parts):  # a temporary name: not a final one
            continue
        if path.suffix == ".json" and path.is_file():
            json.loads(path.read_text())
        elif path.suffix == ".jsonl" and path.is_file():
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.name == "model.safetensors":
            load_file(str(path))
            assert (path.parent / "tokenizer.json").is_file() and (path.parent / "config.json").is_file(), path


def answers_in(db: Path) -> int:
    if not db.is_file():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        try:
            return c.execute("select count(*) from answers").fetchone()[0]
        except sqlite3.OperationalError:  # killed before the tables were made
            return 0


def run_to_the_end(args: list[str], stderr: bool = False) -> str:
    """The command run to its end: its stdout (or stderr)."""
    proc = subprocess.run([sys.executable, "-m", "alignloop", *args], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr if stderr else proc.stdout


def prompts_file(path: Path, fortunes: list[str], n: int) -> Path:
    prompts = list(dict.fromkeys(" ".join(f.split()[:3]) for f in fortunes))[:n]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.mark.slow
def test_sampling_killed_at_random_moments_reruns_to_the_same_campaign(tiny_lm_dir, fortunes, tmp_path, one_thread):
    from alignloop.sampling import SampleConfig, sample_campaign

    prompts = prompts_file(tmp_path / "prompts.jsonl", fortunes, 96)
    out = tmp_path / "out"
    sets = ["k=4", "max_new_tokens=24", "batch_size=32", "seed=3", "precision=fp32", "device=cpu"]
    start = time.time()
    sample_campaign(SampleConfig.load(None, sets, model=tiny_lm_dir, prompts=prompts, out_dir=out))
    work = time.time() - start
    out.rename(tmp_path / "reference")

    def after_kill(run):
        no_half_files(out)
        campaign = out / "campaign.jsonl"  # absent, or whole: written last, renamed into place
        assert not campaign.exists() or campaign.read_bytes() == (tmp_path / "reference/campaign.jsonl").read_bytes()

    args = ["sample", "--model", str(tiny_lm_dir), "--prompts", str(prompts), "--out-dir", str(out),
            *as_sets(sets)]
    kill_at(args, random_moments(lambda run: "generate" in run.err, work, kills=2, seed=1), after_kill)
    run_to_the_end(args)
    compared = same_outputs(tmp_path / "reference", out)
    assert "campaign.jsonl" in compared and "sample_summary.json" in compared


@pytest.mark.slow
def test_simulated_annotation_killed_at_random_moments_resumes_answer_for_answer(tmp_path):
    from alignloop.annotate.simulate import run_simulated_annotation
    from test_demo import LABEL

    (tmp_path / "label.py").write_text(LABEL)
    judge = f"{tmp_path / 'label.py'}:distinct_letters"
    rng = random.Random(0)
    words = "love hate sun rain quick brown fox lazy dog jumps over bright dark cold warm".split()
    campaign = tmp_path / "campaign.jsonl"
    campaign.write_text("".join(json.dumps({"item_id": f"i{i}", "prompt": f"prompt {i}", "responses": [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + f" {j}" for j in range(4)]}) + "\n"
        for i in range(150)))
    out = tmp_path / "out"
    options = ["--label-function", judge, "--annotators", "3", "--overlap", "2", "--noise", "0.2", "--seed", "5"]
    reference = run_simulated_annotation(campaign, out, judge, 3, 2, 0.2, "rank", 5)
    out.rename(tmp_path / "reference")

    def after_kill(run):
        no_half_files(out)
        for name in ("rankings.jsonl", "preferences.jsonl"):  # exported last: absent, or whole
            if (out / name).exists():
                assert len((out / name).read_text().splitlines()) == \
                    len((tmp_path / "reference" / name).read_text().splitlines())
        return answers_in(out / "annotations.db")

    # Each kill comes when the database holds a random number of answers (three, increasing): a moment
    # counted in answers, not seconds, so a run faster or slower than the reference is killed mid-work all
    # the same (a kill timed as a fraction of the reference's seconds once found every answer stored).
    rng = random.Random(2)  # one target in each of three spaced bands, so each run has answers of its own to store
    targets = [int(reference["answers"] * rng.uniform(low, low + 0.2)) for low in (0.1, 0.37, 0.64)]

    def reached(target):
        return lambda run: answers_in(out / "annotations.db") >= target

    args = ["annotate", "simulate", str(campaign), str(out), *options]
    stored = kill_at(args, [(reached(t), 0.0) for t in targets], after_kill)
    # Each killed run kept what it had answered, and the next took up from there.
    assert all(t <= n for t, n in zip(targets, stored)), (targets, stored)
    assert 0 < stored[0] < stored[1] < stored[2] < reference["answers"], (targets, stored)
    summary = json.loads(run_to_the_end(args))
    assert summary["new_answers"] == reference["answers"] - stored[-1]  # resumed, not started again
    compared = same_outputs(tmp_path / "reference", out, skip=(r"annotations\.db.*",))
    assert {"rankings.jsonl", "preferences.jsonl", "all_preferences.jsonl"} <= set(compared)
    assert without_timings(summary) == without_timings(reference)


@pytest.mark.slow
def test_evaluation_killed_at_random_moments_reruns_to_the_same_figures(tiny_lm_dir, tiny_tokenizer, fortunes,
                                                                        tmp_path, one_thread):
    from alignloop.evaluate import EvaluateConfig, evaluate
    from alignloop.reward.model import RewardModel, init_reward_model
    from test_demo import LABEL

    policy = tmp_path / "policy"
    save_model_dir(build_causal_lm(tiny_tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=1),
                   tiny_tokenizer, policy)
    rm = tmp_path / "rm"
    RewardModel(init_reward_model(tiny_lm_dir), load_tokenizer(tiny_lm_dir)).save_pretrained(rm)
    (tmp_path / "label.py").write_text(LABEL)
    prompts = prompts_file(tmp_path / "prompts.jsonl", fortunes, 64)
    out = tmp_path / "out"
    sets = ["num_prompts=64", "max_new_tokens=24", "batch_size=32", f"judge={tmp_path / 'label.py'}:distinct_letters",
            "precision=fp32", "device=cpu"]
    paths = {"policy": policy, "reference": tiny_lm_dir, "reward_model": rm, "prompts": prompts, "out_dir": out}
    start = time.time()
    evaluate(EvaluateConfig.load(None, sets, **paths))
    work = time.time() - start
    out.rename(tmp_path / "reference")

    def after_kill(run):
        no_half_files(out)
        samples = out / "samples.jsonl"
        assert not samples.exists() or samples.read_bytes() == (tmp_path / "reference/samples.jsonl").read_bytes()

    args = ["evaluate", *[a for k, v in paths.items() for a in (f"--{k.replace('_', '-')}", str(v))],
            *as_sets(sets)]
    kill_at(args, random_moments(lambda run: "generate" in run.err, work, kills=2, seed=3), after_kill)
    run_to_the_end(args)
    assert {"samples.jsonl", "evaluate_summary.json"} <= set(same_outputs(tmp_path / "reference", out))


@pytest.mark.slow
def test_the_pipeline_killed_at_random_moments_resumes_to_the_same_models_and_data(fortunes, tmp_path, one_thread):
    """Every stage of one tiny round, checkpointing every step or two, killed at moments spread over the whole run."""
    from alignloop.pipeline import load_pipeline_file, run_pipeline
    from test_demo import tiny_fp32_cpu_sections

    sections = tiny_fp32_cpu_sections(tmp_path, fortunes)
    for name, every in (("pretrain", 2), ("sft", 2), ("reward", 2), ("ppo", 1)):
        sections[name]["checkpoint_every"] = every
    out = tmp_path / "out"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"out": str(out), "rounds": 1, **sections}))
    run_pipeline(load_pipeline_file(config))
    out.rename(tmp_path / "reference")
    took = json.loads((tmp_path / "reference/timings.json").read_text())

    def after_kill(run):
        no_half_files(out)
        return sorted(str(p.parent.relative_to(out)) for p in out.rglob("*_summary.json")), run.err

    # One kill in a random stage of each third of the run, a random moment into that stage's work. The
    # first comes in a training stage once it has checkpointed, at a random step counted by its progress
    # bar (not in seconds: under load a kill timed in the reference's seconds once came before any
    # checkpoint, and nothing was left to resume).
    rng = random.Random(4)
    first = rng.choice((("pretrain", "base"), ("sft", "sft")))
    later = [rng.choice(group) for group in (("round1/sample", "round1/annotate"),
                                              ("round1/reward", "round1/ppo", "round1/evaluate"))]
    moments = [(checkpointed_at(first[0], out / first[1] / "checkpoint", rng.uniform(0.3, 0.8)), 0.0)]
    moments += [(lambda run, stage=stage: f"{stage}: running" in run.err, rng.uniform(0.3, 0.9) * took[stage]["seconds"])
                for stage in later]
    killed = kill_at(["pipeline", "--config", str(config)], moments, after_kill)
    finished = [done for done, _ in killed]
    assert finished == sorted(finished, key=len) and finished[-1] != finished[0], finished
    last = run_to_the_end(["pipeline", "--config", str(config)], stderr=True)
    assert "resuming from" in "".join(err for _, err in killed) + last  # a training stage took up its checkpoint
    compared = same_outputs(tmp_path / "reference", out,
                            skip=(r"annotations\.db.*", r"report\.(json|html)", r"timings\.json", r"plots/.*"))
    assert {f"{d}/model.safetensors" for d in ("base", "sft", "round1/reward_model", "round1/policy",
                                               "round1/policy/critic", "reward_model", "policy")} <= set(compared)
    assert {"round1/sample/campaign.jsonl", "preferences.jsonl", "round1/eval/samples.jsonl"} <= set(compared)


# -- model directories swapped in whole -----------------------------------------------------------------------

def test_a_model_directory_is_replaced_whole_and_keeps_the_stages_other_files(tmp_path, tiny_tokenizer):
    a = build_causal_lm(tiny_tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0)
    b = build_causal_lm(tiny_tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=1)
    out = tmp_path / "policy"
    save_model_dir(a, tiny_tokenizer, out)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.pt").write_bytes(b"state")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "model-00002-of-00002.safetensors").write_bytes(b"a shard of an older save")
    (out / "ppo_summary.json.tmp").write_text('{"cut sh')  # what a kill mid-write leaves
    save_model_dir(b, tiny_tokenizer, out)
    check_model_dir(out)
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in b.state_dict().items() if k in saved)
    assert (out / "checkpoint" / "state.pt").read_bytes() == b"state" and (out / "metrics.jsonl").is_file()
    assert not (out / "model-00002-of-00002.safetensors").exists()  # the old model's files go with it
    assert not (out / "ppo_summary.json.tmp").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]  # no temporary directory left beside it


def test_a_save_that_fails_halfway_leaves_the_old_model_whole(tmp_path, tiny_tokenizer):
    out = tmp_path / "sft"
    model = build_causal_lm(tiny_tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0)
    save_model_dir(model, tiny_tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp)  # the weights are written, then the save dies before the tokenizer
            raise RuntimeError("disk on fire")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="it is a file"):
        save_model_dir(model, tiny_tokenizer, tmp_path / "file")


SAVE_FOREVER = """
import sys
from alignloop.modeling import build_causal_lm, load_tokenizer, save_model_dir
tok = load_tokenizer(sys.argv[1])
models = [build_causal_lm(tok, n_layer=4, n_embd=256, n_head=4, n_positions=64, seed=s) for s in (0, 1)]
print("ready", flush=True)
n = 0
while True:
    save_model_dir(models[n % 2], tok, sys.argv[2])
    n += 1
"""


@pytest.mark.slow
def test_a_model_directory_killed_mid_save_holds_the_old_or_the_new_model_whole(tmp_path, tiny_lm_dir):
    """A process saving two 13 MB models in turn into one directory, SIGKILLed at random moments: the
    directory always holds one of the two whole, both to a reader polling it during the saves and after
    each kill (and most kills land mid-save: a temporary directory is left beside it)."""
    tok = load_tokenizer(tiny_lm_dir)
    models = [{k: v for k, v in build_causal_lm(tok, n_layer=4, n_embd=256, n_head=4, n_positions=64,
                                                seed=s).state_dict().items()} for s in (0, 1)]
    out = tmp_path / "model"
    rng = random.Random(5)
    problems, reads, mid_save = [], 0, 0
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(tiny_lm_dir), str(out)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        kill_at = time.time() + rng.uniform(0.5, 1.5)
        while time.time() < kill_at:  # a reader meanwhile: the directory is whole whenever it looks
            existed = out.exists()  # (before the very first save ends there is nothing to read yet)
            try:
                check_model_dir(out)
                reads += 1
            except InputError as e:
                if existed:
                    problems.append(str(e))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_save += any(p.name.startswith("model.tmp-") for p in tmp_path.iterdir())
        check_model_dir(out)
        saved = load_file(str(out / "model.safetensors"))
        assert any(all(torch.equal(saved[k], m[k]) for k in saved) for m in models), "a mix of the two models"
    assert reads > 0 and not problems, problems[:3]
    assert mid_save >= 1, "no kill landed during a save"
