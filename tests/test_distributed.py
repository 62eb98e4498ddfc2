"""Data parallel on the CPU: 2 processes under torchrun (gloo, fp32) train as 1 process does, rank 0 alone writes,
and a killed 2-process run resumes to the uninterrupted one.

Tolerances. 2 processes compute each step's gradient as two half-batch sums added by one all-reduce, where
1 process computes one full-batch sum: the same numbers added in another order. The SFT test shows that this
is the only difference: the 2-process run equals, bit for bit, one process that backpropagates the same two
shards and adds their gradients. Adam then turns the last-bit differences of gradients that are zero in exact
arithmetic (the attention key biases: softmax ignores them) into steps of up to lr in either direction, so
after 20 steps at lr 1e-3 a few parameters differ by up to ~1e-5 (measured: 3.4e-6 SFT, 9.6e-6 reward) while
the mean difference is ~3e-9 and the parameters moved by over 1e-3 on average. The bounds are 5-10x those.
"""

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

from alignloop.distributed import SINGLE_PROCESS, Distributed, from_environment
from alignloop.errors import ConfigError
from alignloop.training import IGNORE, LMBatch
from test_reward_frozen_trunk import tiny_llama_dir  # noqa: F401 (a fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "alignloop"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
DDP_CPU_YAML = Path(__file__).parent.parent / "examples" / "accelerate" / "ddp_cpu.yaml"
FSDP_YAML = Path(__file__).parent.parent / "examples" / "accelerate" / "fsdp.yaml"
ACCELERATE_FSDP = ACCELERATE + ["--config_file", str(FSDP_YAML), "-m", "alignloop"]

MAX_ABS, MAX_MEAN = 5e-5, 3e-8  # |parameter difference|, 2 processes vs 1: largest, mean (module docstring)
SFT_SETS = {"batch_size": 7, "epochs": 4, "warmup_steps": 2, "lr": 1e-3, "checkpoint_every": 3,
            "precision": "fp32", "device": "cpu"}
REWARD_SETS = {"batch_size": 6, "gradient_accumulation_steps": 2, "epochs": 1.5, "lr": 1e-3, "max_length": 96,
               "normalize_samples": 16, "checkpoint_every": 2, "precision": "fp32", "device": "cpu"}

# Every file a process opens for writing, renames, creates or removes under WRITES_ROOT, one line each,
# prefixed by its RANK; each process first says that it is recorded. Python's audit hooks see every such
# call of the interpreter (not the ones native code makes itself, like safetensors' weights; the model's
# config and tokenizer files beside them are Python's).
RECORDER = '''
import os, sys
if os.environ.get("WRITES_LOG"):
    _root, _rank = os.environ["WRITES_ROOT"], os.environ.get("RANK", "launcher")
    _fd = os.open(os.environ["WRITES_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_fd, f"{_rank} recorded\\n".encode())
    _WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (isinstance(mode, str) and set(mode) & set("wax+")) and not (isinstance(flags, int) and flags & _WRITING):
                return
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(_root):
            os.write(_fd, f"{_rank} {event} {os.fspath(path)}\\n".encode())
    sys.addaudithook(_hook)
'''


def sets(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def recorded_run(command: list[str], out: Path, tmp: Path) -> dict[str, list[str]]:
    """Run `command` with every process's writes under `out` recorded: {rank: [event path, ...]}."""
    (tmp / "recorder").mkdir(exist_ok=True)
    (tmp / "recorder" / "sitecustomize.py").write_text(RECORDER)
    log = tmp / f"writes-{out.name}.log"
    run(command, {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp / "recorder"), ENV.get("PYTHONPATH", "")]),
                  "WRITES_LOG": str(log), "WRITES_ROOT": str(out)})
    writes: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        rank, _, what = line.partition(" ")
        writes.setdefault(rank, []).append(what)
    return writes


def assert_rank_0_alone_wrote(writes: dict[str, list[str]], out: Path, summary: str) -> None:
    assert writes["0"][0] == writes["1"][0] == "recorded"  # both processes were watched
    assert writes["1"] == ["recorded"], writes["1"][:5]
    assert f"os.rename {out / summary}.tmp" in writes["0"]  # the summary, written atomically by rank 0
    # the model, beside its weights: written in `<out>.tmp-XXXX` and swapped in whole (files.atomic_directory)
    assert any(w.startswith(f"open {out}") and w.split(" ", 1)[1].endswith("/config.json") for w in writes["0"])


def parameter_differences(a: Path, b: Path, file: str = "model.safetensors") -> tuple[float, float]:
    x, y = load_file(str(a / file)), load_file(str(b / file))
    assert x.keys() == y.keys()
    d = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
    return float(d.max()), float(d.mean())


def mean_movement(trained: Path, start: Path) -> float:
    x, y = load_file(str(trained / "model.safetensors")), load_file(str(start / "model.safetensors"))
    return float(torch.cat([(x[k] - y[k]).abs().flatten() for k in x if k in y]).mean())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, fortunes) -> dict[str, Path]:
    """SFT pairs (29: global batches of 7 end with one of 1, which leaves rank 1 without rows) and
    preference pairs (37: micro-batches of 6 end with one of 1)."""
    from test_reward_train import sentiment_pairs

    tmp = tmp_path_factory.mktemp("ddp_data")
    pairs = [{"prompt": " ".join(f.split()[:3]), "response": " " + " ".join(f.split()[3:14])}
             for f in fortunes if len(f.split()) > 6][:39]
    return {"sft": write_jsonl(tmp / "sft.jsonl", pairs[:29]), "sft_held": write_jsonl(tmp / "sft_held.jsonl", pairs[29:]),
            "rm": write_jsonl(tmp / "rm.jsonl", sentiment_pairs(fortunes, 37, 0)),
            "rm_held": write_jsonl(tmp / "rm_held.jsonl", sentiment_pairs(fortunes, 12, 1))}


def sft_args(tiny_lm_dir: Path, data: dict[str, Path], out: Path) -> list[str]:
    return ["sft", "--model", str(tiny_lm_dir), "--data", str(data["sft"]), "--out-dir", str(out),
            *sets({**SFT_SETS, "held_out_data": data["sft_held"]})]


def recorded_sft(launcher: list[str], tmp: Path, tiny_lm_dir: Path, data: dict[str, Path]) -> tuple[Path, dict, dict]:
    """The SFT run of `sft_args` under `launcher`, every process's writes recorded: (out, summary, writes)."""
    out = tmp / "out"
    writes = recorded_run(launcher + sft_args(tiny_lm_dir, data, out), out, tmp)
    return out, json.loads((out / "sft_summary.json").read_text()), writes


@pytest.fixture(scope="module")
def sft_two(tmp_path_factory, tiny_lm_dir, data) -> tuple[Path, dict, dict]:
    return recorded_sft(TORCHRUN, tmp_path_factory.mktemp("ddp_sft"), tiny_lm_dir, data)


def test_shard_gives_each_process_a_contiguous_block():
    assert [Distributed(rank, 3).shard(10) for rank in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [Distributed(rank, 2).shard(1) for rank in range(2)] == [range(0, 1), range(1, 1)]
    assert SINGLE_PROCESS.shard(5) == range(0, 5)


def test_a_process_without_rows_gets_one_that_counts_for_nothing():
    batch = LMBatch(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]]), torch.tensor([[IGNORE, 6, 7, IGNORE]]))
    assert batch.target_count() == 2
    rows, n = batch.shard(Distributed(0, 2), torch.device("cpu"))
    assert n == 1 and rows.input_ids.tolist() == [[5, 6, 7]]  # cut to its longest row
    rows, n = batch.shard(Distributed(1, 2), torch.device("cpu"))
    assert n == 0 and rows.input_ids.tolist() == [[5, 6, 7]] and rows.target_count() == 0


def test_one_process_is_the_job_when_no_launcher_started_several():
    assert from_environment() == SINGLE_PROCESS  # pytest runs under no launcher
    model = torch.nn.Linear(2, 2)
    assert SINGLE_PROCESS.wrap(model) is model
    assert SINGLE_PROCESS.all_reduce_sum([1.5, 2]) == [1.5, 2]
    assert SINGLE_PROCESS.all_gather({"a": 1}) == [{"a": 1}] and SINGLE_PROCESS.broadcast("x") == "x"


@pytest.mark.slow
def test_sft_on_2_processes_is_the_1_process_run_up_to_the_order_of_sums(sft_two, tiny_lm_dir, data, tmp_path):
    from alignloop.sft import SFTConfig, sft

    out, two, writes = sft_two
    one = sft(SFTConfig(model=tiny_lm_dir, data=data["sft"], held_out_data=data["sft_held"], out_dir=tmp_path / "one",
                        **SFT_SETS))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # Per epoch: 4 batches of 7 (rows 0-3 to rank 0, 4-6 to rank 1), then 1 of 1 (rank 0's).
    assert one["steps"] == two["steps"] == 20 and one["examples_per_process"] == [29 * 4]
    assert two["examples_per_process"] == [17 * 4, 12 * 4]
    max_diff, mean_diff = parameter_differences(tmp_path / "one", out)
    assert max_diff < MAX_ABS and mean_diff < MAX_MEAN, (max_diff, mean_diff)
    assert mean_movement(out, tiny_lm_dir) > 1e-3
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-6)
    ppl_one, ppl_two = one["held_out_response_perplexity"], two["held_out_response_perplexity"]
    # The held-out pass batches at one process's share of the batch (7 rows alone, 3 on each of two), so
    # its sums group differently even before any training: float order only.
    assert ppl_two["before_sft"] == pytest.approx(ppl_one["before_sft"], rel=1e-6)
    assert ppl_two["after_sft"] == pytest.approx(ppl_one["after_sft"], rel=1e-5)
    assert_rank_0_alone_wrote(writes, out, "sft_summary.json")
    # The whole difference is the split of the sums: one process adding the gradients of the same two
    # shards ends with the 2-process run's parameters, bit for bit.
    emulated = emulate_two_shards(tiny_lm_dir, data["sft"], SFTConfig(model=tiny_lm_dir, data=data["sft"],
                                                                      out_dir=tmp_path / "emulated", **SFT_SETS))
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], emulated[k]) for k in weights)


def emulate_two_shards(tiny_lm_dir: Path, pairs: Path, config) -> dict[str, torch.Tensor]:
    """In one process, what 2 DDP processes compute: every global batch's two shards backpropagated,
    their gradients added, one optimiser step; returns the final parameters."""
    from alignloop.modeling import load_causal_lm, load_tokenizer
    from alignloop.sft import encode_pairs, pair_batches, read_pairs
    from alignloop.tokenizer import CONTINUATION_TEMPLATE
    from alignloop.training import lm_loss_sum, model_optimizer, optimizer_step, warmup_cosine

    tokenizer = load_tokenizer(tiny_lm_dir)
    tokenizer.chat_template = tokenizer.chat_template or CONTINUATION_TEMPLATE
    model = load_causal_lm(tiny_lm_dir, torch.device("cpu"), tokenizer)
    encoded, _ = encode_pairs(tokenizer, read_pairs(pairs), config.max_length)
    batches = [batch for epoch in range(int(config.epochs))
               for batch in pair_batches(encoded, config.batch_size, tokenizer.pad_token_id, "cpu", config.seed + epoch)]
    masters, optimizer, params = model_optimizer(model, config.lr, config.weight_decay, "fp32")
    scheduler = warmup_cosine(optimizer, config.warmup_steps, len(batches))
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes ran (ENV): the same order of sums inside every matmul
    try:
        for batch in batches:
            for rank in range(2):
                rows, _ = batch.shard(Distributed(rank, 2), torch.device("cpu"))
                (lm_loss_sum(model, rows, "fp32")[0] / batch.target_count()).backward()
            optimizer_step(optimizer, scheduler, masters, params, config.grad_clip)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


@pytest.mark.slow
def test_reward_training_on_2_processes_is_the_1_process_run_up_to_the_order_of_sums(tiny_lm_dir, data, tmp_path):
    from alignloop.reward.train import RewardTrainConfig, train_reward_model

    one = train_reward_model(RewardTrainConfig(model=tiny_lm_dir, data=data["rm"], held_out_data=data["rm_held"],
                                               out_dir=tmp_path / "one", **REWARD_SETS))
    out = tmp_path / "two"
    writes = recorded_run(TORCHRUN + ["reward", "train", "--model", str(tiny_lm_dir), "--data", str(data["rm"]),
                                      "--held-out-data", str(data["rm_held"]), "--out-dir", str(out),
                                      *sets(REWARD_SETS)], out, tmp_path)
    two = json.loads((out / "reward_summary.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # ceil(37 items x 1.5 epochs / 12 per step) = 5 steps, 10 micro-batches: 8 of 6 (3 + 3 per process)
    # and each epoch's one of 1 (rank 0's; rank 1 scores a null item in its place).
    assert one["steps"] == two["steps"] == 5 and one["examples_per_process"] == [50]
    assert two["examples_per_process"] == [26, 24]
    max_diff, mean_diff = parameter_differences(tmp_path / "one", out)
    assert max_diff < MAX_ABS and mean_diff < MAX_MEAN, (max_diff, mean_diff)
    assert mean_movement(out, tiny_lm_dir) > 1e-3
    for key in ("final_train_loss", "train_accuracy", "held_out_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert two["held_out_accuracy"] == one["held_out_accuracy"]
    assert two["held_out_eval"]["accuracy"] == one["held_out_eval"]["accuracy"]
    assert_rank_0_alone_wrote(writes, out, "reward_summary.json")


@pytest.mark.slow
@pytest.mark.parametrize("backbone, train_layers", [("tiny_lm_dir", 0), ("tiny_llama_dir", 2)])
def test_reward_training_sharded_by_fsdp_is_the_1_process_run_up_to_the_order_of_sums(backbone, train_layers, data,
                                                                                     tmp_path, request):
    """GPT-2 trained whole, and a Llama (rotary positions) with its top 2 of 3 layers trained from the
    frozen lowest one's cached states: the FSDP root is the item scorer, whose forward runs the
    backbone and the head apart."""
    from alignloop.reward.train import RewardTrainConfig, train_reward_model

    model_dir = request.getfixturevalue(backbone)
    settings = {**REWARD_SETS, "train_layers": train_layers}
    one = train_reward_model(RewardTrainConfig(model=model_dir, data=data["rm"], held_out_data=data["rm_held"],
                                               out_dir=tmp_path / "one", **settings))
    out = tmp_path / "fsdp"
    run(ACCELERATE_FSDP + ["reward", "train", "--model", str(model_dir), "--data", str(data["rm"]),
                           "--held-out-data", str(data["rm_held"]), "--out-dir", str(out), *sets(settings)])
    two = json.loads((out / "reward_summary.json").read_text())
    assert (two["world_size"], two["sharding"], two["examples_per_process"]) == (2, "fsdp", [26, 24])
    max_diff, mean_diff = parameter_differences(tmp_path / "one", out)
    assert max_diff < MAX_ABS and mean_diff < MAX_MEAN, (max_diff, mean_diff)
    assert mean_movement(out, model_dir) > 5e-4  # over every parameter, the frozen lowest layer's too
    for key in ("final_train_loss", "train_accuracy", "held_out_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


def worker_pids(launcher: int) -> list[int]:
    return [int(pid) for task in Path(f"/proc/{launcher}/task").iterdir()
            for pid in (task / "children").read_text().split()]


def killed_after_first_checkpoint(command: list[str], out: Path) -> dict:
    """Start the job, SIGKILL it (launcher and workers) once its first checkpoint is written; that checkpoint."""
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint" / "state.pt").is_file():
        assert launcher.poll() is None, f"finished before its first checkpoint: {launcher.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    # The whole job dies at once: torchrun's workers live in sessions of their own, so each is killed.
    for pid in worker_pids(launcher.pid) + [launcher.pid]:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    return torch.load(out / "checkpoint" / "state.pt", weights_only=False)


@pytest.mark.slow
def test_a_killed_2_process_run_resumes_to_the_uninterrupted_one(sft_two, tiny_lm_dir, data, tmp_path):
    whole, whole_summary, _ = sft_two
    killed = tmp_path / "killed"
    args = sft_args(tiny_lm_dir, data, killed)
    state = killed_after_first_checkpoint(TORCHRUN + args, killed)
    assert len(state["rng"]) == 2 and state["step"] % 3 == 0 and state["step"] < 20  # every rank's RNG state
    # Resumed by the other launcher: accelerate starts the same 2 processes through torchrun.
    resumed = run(ACCELERATE + ["--config_file", str(DDP_CPU_YAML), "-m", "alignloop", *args])
    assert "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert parameter_differences(whole, killed) == (0.0, 0.0)
    summary = json.loads((killed / "sft_summary.json").read_text())
    for key in ("steps", "examples_per_process", "final_train_loss", "held_out_response_perplexity", "world_size"):
        assert summary[key] == whole_summary[key], key
    assert not (killed / "checkpoint").exists()


def test_accelerate_cpu_launch_of_several_processes_is_refused_in_one_line(tiny_lm_dir, data, tmp_path):
    done = subprocess.run(ACCELERATE + ["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                        "no", "--dynamo_backend", "no", "--quiet", "-m", "alignloop",
                                        *sft_args(tiny_lm_dir, data, tmp_path / "out")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "starts ONE process" in errors[0] and "ddp_cpu.yaml" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# PPO: a short run (one flipped sampled token makes two runs diverge), a group split across the two
# processes' shards (batch 6 of 3 prompts x 2 samples: rows 0-2 and 3-5), two mini-batches of
# two micro-batches; and GRPO with one mini-batch, whose first update reuses each process's rollout forwards.
PPO_SETS = {"steps": 3, "batch_size": 6, "samples_per_prompt": 2, "mini_batch_size": 6, "ppo_epochs": 2,
            "max_new_tokens": 8, "lr": 1e-3, "precision": "fp32", "device": "cpu", "tensorboard": False,
            "checkpoint_every": 0, "target_kl": "null"}
PPO_CASES = {"ppo": {"critic": "separate", "batch_size": 8, "mini_batch_size": 4, "gradient_accumulation_steps": 2,
                     "whiten_rewards": True},
             "grpo": {"algorithm": "grpo", "kl_loss_coef": 0.05}}


def ppo_args(tiny_lm_dir: Path, rm_dir: Path, prompts_file: Path, out: Path, **overrides) -> list[str]:
    return ["ppo", "--policy", str(tiny_lm_dir), "--reward-model", str(rm_dir), "--prompts", str(prompts_file),
            "--out-dir", str(out), *sets({**PPO_SETS, **overrides})]


def metric_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_ppo_runs(one: Path, two: Path, start: Path) -> None:
    """Two 3-step PPO runs of the same config: the same episodes sampled (the same lengths and EOS,
    exactly), every metric and parameter equal up to the order of sums, and the policy moved."""
    rows_one, rows_two = metric_rows(one), metric_rows(two)
    assert len(rows_one) == len(rows_two) == 3
    for a, b in zip(rows_one, rows_two):
        assert (a["response_length_mean"], a["eos_rate"]) == (b["response_length_mean"], b["eos_rate"])
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    max_diff, mean_diff = parameter_differences(one, two)
    assert max_diff < MAX_ABS and mean_diff < MAX_MEAN, (max_diff, mean_diff)
    assert mean_movement(two, start) > 1e-4


def ppo_on_1_and_2_processes(launcher: list[str], args, tmp_path: Path) -> tuple[dict, dict, dict]:
    """The command line `args(out)` run by one process into tmp_path/one and by `launcher`'s two into
    tmp_path/two: both summaries, and what each rank of the second wrote (recorded_run)."""
    run([sys.executable, "-m", "alignloop", *args(tmp_path / "one")])
    writes = recorded_run(launcher + args(tmp_path / "two"), tmp_path / "two", tmp_path)
    one, two = (json.loads((tmp_path / name / "ppo_summary.json").read_text()) for name in ("one", "two"))
    return one, two, writes


@pytest.mark.slow
@pytest.mark.parametrize("case", PPO_CASES)
def test_ppo_on_2_processes_is_the_1_process_run_up_to_the_order_of_sums(case, tiny_lm_dir, rm_dir, prompts_file,
                                                                          tmp_path):
    one, two, writes = ppo_on_1_and_2_processes(
        TORCHRUN, lambda out: ppo_args(tiny_lm_dir, rm_dir, prompts_file, out, **PPO_CASES[case]), tmp_path)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    batch = PPO_CASES[case].get("batch_size", PPO_SETS["batch_size"])
    assert one["episodes_per_process"] == [3 * batch] and two["episodes_per_process"] == [3 * batch // 2] * 2
    assert_same_ppo_runs(tmp_path / "one", tmp_path / "two", tiny_lm_dir)
    assert writes["1"] == ["recorded"], writes["1"][:5]
    assert f"os.rename {tmp_path / 'two' / 'ppo_summary.json'}.tmp" in writes["0"]


@pytest.mark.slow
def test_a_killed_2_process_ppo_run_resumes_to_the_uninterrupted_one(tiny_lm_dir, rm_dir, prompts_file, tmp_path):
    args = lambda out: ppo_args(tiny_lm_dir, rm_dir, prompts_file, out, steps=5, checkpoint_every=1)  # noqa: E731
    run(TORCHRUN + args(tmp_path / "whole"))
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(TORCHRUN + args(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.time() + 240
    while not (killed / "metrics.jsonl").is_file() or len((killed / "metrics.jsonl").read_text().splitlines()) < 2:
        assert launcher.poll() is None, f"finished before its second step: {launcher.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no step was logged"
        time.sleep(0.01)
    time.sleep(0.1)  # inside the next step
    for pid in worker_pids(launcher.pid) + [launcher.pid]:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    state = torch.load(killed / "checkpoint" / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and 2 <= state["step"] < 5  # every rank's RNG state
    resumed = run(TORCHRUN + args(killed))
    assert "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert parameter_differences(tmp_path / "whole", killed) == (0.0, 0.0)
    assert metric_rows(tmp_path / "whole") == metric_rows(killed)


# PPO sharded by FSDP: the policy and the critic (a separate model, or the value head as a unit of
# its own) each hold half of every block; each process samples from a whole copy of the policy gathered
# after every update. The value-head case's mini-batches of 3 in micro-batches of 1 give rank 0 two rows
# and rank 1 one: rank 1 runs a second micro-batch that counts for nothing, as FSDP's collectives need.
FSDP_PPO_CASES = {"separate_critic": PPO_CASES["ppo"],
                  "value_head": {"critic": "value_head", "mini_batch_size": 3, "gradient_accumulation_steps": 3},
                  "lora": {"lora_r": 4, "lora_alpha": 8, "critic": "value_head"}}


@pytest.mark.slow
@pytest.mark.parametrize("case", FSDP_PPO_CASES)
def test_ppo_sharded_by_fsdp_is_the_1_process_run_up_to_the_order_of_sums(case, tiny_lm_dir, rm_dir, prompts_file,
                                                                          tmp_path):
    _, two, writes = ppo_on_1_and_2_processes(
        ACCELERATE_FSDP, lambda out: ppo_args(tiny_lm_dir, rm_dir, prompts_file, out, **FSDP_PPO_CASES[case]), tmp_path)
    assert (two["world_size"], two["sharding"]) == (2, "fsdp")
    assert_same_ppo_runs(tmp_path / "one", tmp_path / "two", tiny_lm_dir)
    if case == "separate_critic":
        assert parameter_differences(tmp_path / "one" / "critic", tmp_path / "two" / "critic")[0] < MAX_ABS
    if case == "lora":  # the merged policy above, and the adapters alone, as a 1-process LoRA run saves them
        assert parameter_differences(tmp_path / "one" / "adapter", tmp_path / "two" / "adapter",
                                     "adapter_model.safetensors")[0] < MAX_ABS
    assert writes["1"] == ["recorded"], writes["1"][:5]


@pytest.mark.slow
def test_a_killed_fsdp_ppo_run_resumes_to_the_uninterrupted_one_and_refuses_a_ddp_resume(tiny_lm_dir, rm_dir,
                                                                                         prompts_file, tmp_path):
    args = lambda out: ppo_args(tiny_lm_dir, rm_dir, prompts_file, out, steps=4, checkpoint_every=1,  # noqa: E731
                                **FSDP_PPO_CASES["separate_critic"])
    run(ACCELERATE_FSDP + args(tmp_path / "whole"))
    killed = tmp_path / "killed"
    state = killed_after_first_checkpoint(ACCELERATE_FSDP + args(killed), killed)
    assert state["sharding"] == "fsdp" and len(state["rng"]) == 2 and state["step"] < 4
    assert set(state["models"]) == {"policy", "critic"}
    refused = subprocess.run(TORCHRUN + args(killed), env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors and "written by a fsdp run and this one is replicated" in errors[0], refused.stderr[-2000:]
    resumed = run(ACCELERATE_FSDP + args(killed))
    assert "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert parameter_differences(tmp_path / "whole", killed) == (0.0, 0.0)
    assert parameter_differences(tmp_path / "whole" / "critic", killed / "critic") == (0.0, 0.0)
    assert metric_rows(tmp_path / "whole") == metric_rows(killed)


# DPO: 37 preference pairs in micro-batches of 6 (the last of 1 leaves rank 1 a pair that counts for
# nothing), 2 micro-batches per step, packed pairs; the reference log-probs each process computes for its
# block and gathers.
DPO_SETS = {"batch_size": 6, "gradient_accumulation_steps": 2, "epochs": 2, "lr": 1e-3, "max_length": 96,
            "checkpoint_every": 0, "eval_every": 2, "tensorboard": False, "precision": "fp32", "device": "cpu"}


@pytest.mark.slow
def test_dpo_on_2_processes_is_the_1_process_run_up_to_the_order_of_sums(tiny_lm_dir, data, tmp_path):
    from alignloop.dpo.train import DPOConfig, train_dpo

    two_out = tmp_path / "two"
    writes = recorded_run(TORCHRUN + ["dpo", "--model", str(tiny_lm_dir), "--data", str(data["rm"]),
                                      "--out-dir", str(two_out), *sets({**DPO_SETS, "held_out_data": data["rm_held"]})],
                          two_out, tmp_path)
    one = train_dpo(DPOConfig(model=tiny_lm_dir, data=data["rm"], held_out_data=data["rm_held"],
                              out_dir=tmp_path / "one", **DPO_SETS))
    two = json.loads((two_out / "dpo_summary.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["steps"] == two["steps"] == 7
    assert sum(two["examples_per_process"]) == one["examples_per_process"][0] == 2 * 37
    assert two["examples_per_process"][0] > two["examples_per_process"][1]  # the last micro-batch's one pair
    max_diff, mean_diff = parameter_differences(tmp_path / "one", two_out)
    assert max_diff < MAX_ABS and mean_diff < MAX_MEAN, (max_diff, mean_diff)
    assert mean_movement(two_out, tiny_lm_dir) > 1e-3
    for key in ("first_train_loss", "final_train_loss", "final_train_reward_margin", "held_out_loss",
                "held_out_reward_accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert_rank_0_alone_wrote(writes, two_out, "dpo_summary.json")


@pytest.mark.slow
def test_a_killed_2_process_dpo_run_resumes_to_the_uninterrupted_one(tiny_lm_dir, data, tmp_path):
    args = lambda out: ["dpo", "--model", str(tiny_lm_dir), "--data", str(data["rm"]), "--out-dir", str(out),  # noqa: E731
                        *sets({**DPO_SETS, "held_out_data": data["rm_held"], "checkpoint_every": 2})]
    run(TORCHRUN + args(tmp_path / "whole"))
    killed = tmp_path / "killed"
    state = killed_after_first_checkpoint(TORCHRUN + args(killed), killed)
    assert len(state["rng"]) == 2 and state["step"] in (2, 4, 6)  # every rank's RNG state
    resumed = run(TORCHRUN + args(killed))
    assert "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert parameter_differences(tmp_path / "whole", killed) == (0.0, 0.0)
    whole, again = (json.loads((d / "dpo_summary.json").read_text()) for d in (tmp_path / "whole", killed))
    for key in ("final_train_loss", "held_out_loss", "held_out_reward_accuracy", "examples_per_process"):
        assert again[key] == whole[key], key


@pytest.mark.slow
def test_dpo_sharded_by_fsdp_is_the_1_process_run_and_a_killed_run_resumes_to_the_uninterrupted_one(
        tiny_lm_dir, data, tmp_path):
    """The FSDP root is the pair scorer (trunk and LM head on the predicting positions); held-out
    evaluations every 2 steps go through it with both processes in step (37 pairs: ranks score 19 and 18)."""
    from alignloop.dpo.train import DPOConfig, train_dpo

    args = lambda out, every: ["dpo", "--model", str(tiny_lm_dir), "--data", str(data["rm"]),  # noqa: E731
                               "--out-dir", str(out),
                               *sets({**DPO_SETS, "held_out_data": data["rm_held"], "checkpoint_every": every})]
    run(ACCELERATE_FSDP + args(tmp_path / "whole", 0))
    one = train_dpo(DPOConfig(model=tiny_lm_dir, data=data["rm"], held_out_data=data["rm_held"],
                              out_dir=tmp_path / "one", **DPO_SETS))
    two = json.loads((tmp_path / "whole" / "dpo_summary.json").read_text())
    assert (two["world_size"], two["sharding"], two["steps"]) == (2, "fsdp", one["steps"])
    assert sum(two["examples_per_process"]) == one["examples_per_process"][0]
    max_diff, mean_diff = parameter_differences(tmp_path / "one", tmp_path / "whole")
    assert max_diff < MAX_ABS and mean_diff < MAX_MEAN, (max_diff, mean_diff)
    for key in ("final_train_loss", "held_out_loss", "held_out_reward_accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key

    killed = tmp_path / "killed"
    state = killed_after_first_checkpoint(ACCELERATE_FSDP + args(killed, 2), killed)
    assert state["sharding"] == "fsdp" and len(state["rng"]) == 2 and state["step"] in (2, 4, 6)
    resumed = run(ACCELERATE_FSDP + args(killed, 2))
    assert "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert parameter_differences(tmp_path / "whole", killed) == (0.0, 0.0)
    again = json.loads((killed / "dpo_summary.json").read_text())
    for key in ("final_train_loss", "held_out_loss", "examples_per_process"):
        assert again[key] == two[key], key


@pytest.mark.slow
def test_the_pipeline_on_2_processes_trains_on_both_and_runs_the_other_stages_once(fortunes, tmp_path):
    """`alignloop pipeline --nproc 2`: pretrain, SFT, reward and PPO on 2 processes; sampling, simulated
    annotation and evaluation on rank 0 alone, the other waiting; every file written by rank 0."""
    from test_demo import tiny_fp32_cpu_sections

    sections = tiny_fp32_cpu_sections(tmp_path, fortunes)
    out = tmp_path / "out"
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps({"out": str(out), "rounds": 1, **sections}))  # JSON is YAML
    writes = recorded_run([sys.executable, "-m", "alignloop", "pipeline", "--config", str(config), "--nproc", "2"],
                          out, tmp_path)
    assert writes["1"] == ["recorded"], writes["1"][:5]
    assert (out / "report.html").is_file() and (out / "policy" / "model.safetensors").is_file()
    world = {stage: json.loads(next(out.rglob(f"{stage}_summary.json")).read_text())["world_size"]
             for stage in ("pretrain", "sft", "sample", "annotate", "reward", "ppo", "evaluate")}
    assert world == {"pretrain": 2, "sft": 2, "sample": 1, "annotate": 1, "reward": 2, "ppo": 2, "evaluate": 1}
    assert json.loads((out / "round1" / "policy" / "ppo_summary.json").read_text())["episodes_per_process"] == [8, 8]


@pytest.mark.slow
def test_the_pipeline_under_fsdp_shards_every_training_stage(fortunes, tmp_path):
    """Its PPO trains LoRA adapters, sharded with their frozen base, and saves them merged and alone."""
    from test_demo import tiny_fp32_cpu_sections

    out = tmp_path / "out"
    config = tmp_path / "pipeline.yaml"
    sections = tiny_fp32_cpu_sections(tmp_path, fortunes)
    sections["ppo"] = {**sections["ppo"], "lora_r": 4, "lora_alpha": 8}
    config.write_text(json.dumps({"out": str(out), "rounds": 1, **sections}))
    writes = recorded_run(ACCELERATE_FSDP + ["pipeline", "--config", str(config)], out, tmp_path)
    assert writes["1"] == ["recorded"], writes["1"][:5]
    assert (out / "report.html").is_file() and (out / "policy" / "model.safetensors").is_file()
    assert (out / "round1" / "policy" / "adapter" / "adapter_model.safetensors").is_file()
    launch = {stage: (summary["world_size"], summary.get("sharding"))
              for stage in ("pretrain", "sft", "sample", "reward", "ppo", "evaluate")
              for summary in [json.loads(next(out.rglob(f"{stage}_summary.json")).read_text())]}
    assert launch == {"pretrain": (2, "fsdp"), "sft": (2, "fsdp"), "sample": (1, None), "reward": (2, "fsdp"),
                      "ppo": (2, "fsdp"), "evaluate": (1, None)}


@pytest.mark.parametrize("environ, refusal", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "ZeRO stage would be ignored"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set `fsdp_version: 2`"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "sometimes"},
     "expected true or false"),
])
def test_a_sharding_config_alignloop_cannot_honour_is_refused_not_ignored(environ, refusal, monkeypatch):
    # The same ConfigError path as the accelerate CPU launch above, which checks the CLI's one line.
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=refusal) as refused:
        from_environment.__wrapped__()  # uncached: what the first StageContext of a process calls
    assert "\n" not in str(refused.value)


def test_fsdp_settings_come_from_accelerates_environment():
    from alignloop.fsdp import FSDPSettings, settings_from_environment

    assert settings_from_environment({}) is None
    assert settings_from_environment({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == FSDPSettings()
    zero2 = settings_from_environment({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                       "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_OFFLOAD_PARAMS": "true",
                                       "FSDP_TRANSFORMER_CLS_TO_WRAP": "GPT2Block, LlamaDecoderLayer"})
    assert zero2 == FSDPSettings(reshard_after_forward=False, offload_params=True,
                                 block_classes=("GPT2Block", "LlamaDecoderLayer"))


# FSDP (examples/accelerate/fsdp.yaml, gloo on the CPU): each process holds half of every block's
# parameters, gradients and Adam state. Its gradients are reduce-scattered (each process gets the
# average of its shard), where DDP all-reduces whole buckets: other sums in another order, so the
# 2-process FSDP run matches 1 process to the same tolerance as DDP does, not bit for bit.
@pytest.fixture(scope="module")
def sft_fsdp(tmp_path_factory, tiny_lm_dir, data) -> tuple[Path, dict, dict]:
    return recorded_sft(ACCELERATE_FSDP, tmp_path_factory.mktemp("fsdp_sft"), tiny_lm_dir, data)


@pytest.mark.slow
def test_sft_sharded_by_fsdp_on_2_processes_is_the_1_process_run_up_to_the_order_of_sums(sft_fsdp, tiny_lm_dir,
                                                                                        data, tmp_path):
    from alignloop.sft import SFTConfig, sft

    out, two, writes = sft_fsdp
    one = sft(SFTConfig(model=tiny_lm_dir, data=data["sft"], held_out_data=data["sft_held"], out_dir=tmp_path / "one",
                        **SFT_SETS))
    assert (two["world_size"], two["sharding"]) == (2, "fsdp") and two["examples_per_process"] == [17 * 4, 12 * 4]
    max_diff, mean_diff = parameter_differences(tmp_path / "one", out)
    assert max_diff < MAX_ABS and mean_diff < MAX_MEAN, (max_diff, mean_diff)
    assert mean_movement(out, tiny_lm_dir) > 1e-3
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-6)
    assert two["held_out_response_perplexity"]["after_sft"] == pytest.approx(
        one["held_out_response_perplexity"]["after_sft"], rel=1e-5)
    assert_rank_0_alone_wrote(writes, out, "sft_summary.json")
    # The saved model is a plain HF directory: the tied head is the embedding, as in the 1-process model.
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == load_file(str(tmp_path / "one" / "model.safetensors")).keys()


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_one_and_refuses_a_ddp_resume(sft_fsdp, tiny_lm_dir, data,
                                                                                     tmp_path):
    whole, whole_summary, _ = sft_fsdp
    killed = tmp_path / "killed"
    args = sft_args(tiny_lm_dir, data, killed)
    state = killed_after_first_checkpoint(ACCELERATE_FSDP + args, killed)
    assert state["sharding"] == "fsdp" and len(state["rng"]) == 2 and state["step"] < 20
    # The optimiser state of a sharded run is keyed by parameter name: a DDP launch must not take it.
    refused = subprocess.run(TORCHRUN + args, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors and "written by a fsdp run and this one is replicated" in errors[0], refused.stderr[-2000:]
    # The one traceback is torchrun's own report that a worker exited non-zero; none comes from alignloop.
    assert "alignloop/" not in refused.stderr.partition("Traceback")[2]
    resumed = run(ACCELERATE_FSDP + args)
    assert "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert parameter_differences(whole, killed) == (0.0, 0.0)
    summary = json.loads((killed / "sft_summary.json").read_text())
    for key in ("steps", "examples_per_process", "final_train_loss", "held_out_response_perplexity", "world_size"):
        assert summary[key] == whole_summary[key], key


def test_nproc_runs_the_command_under_torchrun_and_refuses_more_processes_than_cores(monkeypatch):
    from alignloop.distributed import torchrun_command

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    command, env = torchrun_command(cores, ["sft", "--model", "m"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cores),
                           "-m", "alignloop", "sft", "--model", "m"] and env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ConfigError, match=f"more processes than the {cores} core"):
        torchrun_command(cores + 1, ["sft"])
