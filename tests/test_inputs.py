"""Bad input gives one line naming file, line and field — never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop.config import StageConfig
from alignloop.corpus import load_corpus
from alignloop.errors import ConfigError, InputError
from alignloop.jsonl import read_jsonl, write_jsonl
from alignloop.modeling import (check_model_dir, check_same_tokenizer, load_causal_lm, load_scalar_model,
                                load_tokenizer)
from alignloop.sft import SFTConfig
from alignloop.tokenizer import train_tokenizer

# The console script pip installed beside this interpreter: what a user runs.
ALIGNLOOP = str(Path(sys.executable).with_name("alignloop"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignloop", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    with pytest.raises(InputError) as err:
        read_jsonl(path, required={"prompt": str})
    assert str(err.value).startswith(f"{path}:2: not valid JSON")


def test_missing_and_mistyped_field_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"text": "no prompt"}\n')
    with pytest.raises(InputError, match=r"prompts.jsonl:3: field 'prompt': missing"):
        read_jsonl(path, required={"prompt": str})
    path.write_text('{"prompt": 7}\n')
    with pytest.raises(InputError, match=r"prompts.jsonl:1: field 'prompt': expected str, got int"):
        read_jsonl(path, required={"prompt": str})


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(InputError, match="the corpus is empty"):
        load_corpus(tmp_path / "empty.txt")


def test_unknown_config_key_names_file_line_and_key(tmp_path, tiny_lm_dir):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {tiny_lm_dir}\nepochs: 1\nlearning_rate: 0.1\n")
    with pytest.raises(InputError) as err:
        SFTConfig.load(cfg)
    assert str(err.value).startswith(f"{cfg}:3: field 'learning_rate': unknown key for SFTConfig")


def test_config_validates_up_front(tiny_lm_dir):
    with pytest.raises(ConfigError, match="prompt_words_min <= prompt_words_max"):
        SFTConfig(model=tiny_lm_dir, prompt_words_min=5, prompt_words_max=2)
    # YAML-style strings are coerced to the declared types.
    cfg = SFTConfig.load(None, ["lr=1e-4", "epochs=2"], model=str(tiny_lm_dir))
    assert cfg.lr == 1e-4 and cfg.epochs == 2.0 and cfg.model == tiny_lm_dir


def test_config_saved_beside_outputs_round_trips(tmp_path, tiny_lm_dir):
    cfg = SFTConfig(model=tiny_lm_dir, lr=3e-4)
    path = cfg.save(tmp_path)
    assert SFTConfig.load(path) == cfg


def test_cli_wrong_model_path(tmp_path):
    assert_one_line_error(run_cli("sft", "--model", str(tmp_path / "nope")), str(tmp_path / "nope"), "no such model directory")


def test_cli_empty_corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text("")
    assert_one_line_error(run_cli("pretrain", "--corpus", str(tmp_path / "corpus.txt"), "--out-dir", str(tmp_path / "o")),
                          "corpus.txt", "the corpus is empty")


def test_cli_malformed_prompts_line(tmp_path, tiny_lm_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": ["not", "text"]}) + "\n")
    result = run_cli("generate", "--model", str(tiny_lm_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"))
    assert_one_line_error(result, "p.jsonl:2", "field 'prompt'", "expected str, got list")


def test_cli_unknown_config_key(tmp_path, tiny_lm_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nbatchsize: 4\n")
    assert_one_line_error(run_cli("sft", "--model", str(tiny_lm_dir), "--config", str(cfg)),
                          "c.yaml:2", "field 'batchsize'", "unknown key")


def test_parquet_and_datasets_directory_read_like_jsonl(tmp_path):
    import datasets

    from alignloop.jsonl import read_records

    ds = datasets.Dataset.from_list([{"prompt": "a", "response": " b"}, {"prompt": "c", "response": " d"}])
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    ds.save_to_disk(str(tmp_path / "pairs_ds"))
    for source in (tmp_path / "pairs.parquet", tmp_path / "pairs_ds"):
        rows = read_records(source, required={"prompt": str})
        assert [(r["prompt"], r["response"], r["_line"]) for r in rows] == [("a", " b", 1), ("c", " d", 2)]
    bad = datasets.Dataset.from_list([{"prompt": 1}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match=r"bad.parquet:1: field 'prompt': expected str, got int"):
        read_records(tmp_path / "bad.parquet", required={"prompt": str})


# ---- model directories: each way a directory can be broken, checked cheaply, refused in one line --------

def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def config_without_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def truncated_safetensors(d: Path) -> None:
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def no_tokenizer_files(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink()


def weights_without_config(d: Path) -> None:
    (d / "config.json").unlink()


def tmp_leftover(d: Path) -> None:
    shutil.copy(d / "model.safetensors", d / "model.safetensors.tmp")


def config_not_json(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "gpt2",\n  "n_layer": 2,,\n}')


def config_not_utf8(d: Path) -> None:
    (d / "config.json").write_bytes(b'{"model_type": "gpt\xff2"}')


def config_without_model_type(d: Path) -> None:
    edit_json(d / "config.json", model_type=None)


def config_with_mistyped_field(d: Path) -> None:
    edit_json(d / "config.json", n_layer="two")


def config_from_a_larger_model(d: Path) -> None:
    edit_json(d / "config.json", n_embd=128)


def config_with_more_layers_than_weights(d: Path) -> None:
    edit_json(d / "config.json", n_layer=10 ** 12)  # would hang building the model, or load random layers


def empty_safetensors(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"")


def truncated_bin(d: Path) -> None:
    import torch

    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) - 200])


def index_names_missing_shard(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def tokenizer_without_eos(d: Path) -> None:
    edit_json(d / "tokenizer_config.json", eos_token=None)


def tokenizer_json_corrupt(d: Path) -> None:
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')


# (how the directory is broken, what the one line must say)
BROKEN_MODEL_DIRS = [
    (config_without_weights, "no weight files"),
    (truncated_safetensors, "model.safetensors: corrupt or truncated safetensors file"),
    (no_tokenizer_files, "no tokenizer files"),
    (weights_without_config, "has model.safetensors but no config.json"),
    (tmp_leftover, "half-written model directory (holds model.safetensors.tmp)"),
    (config_not_json, "config.json:2: not valid JSON"),
    (config_not_utf8, "config.json:1: not UTF-8 text (byte 0xff"),
    (config_without_model_type, "config.json: field 'model_type': missing"),
    (config_with_mistyped_field, "config.json: transformers rejects it"),
    (config_from_a_larger_model, "the weights' shapes do not match config.json"),
    (config_with_more_layers_than_weights, "config.json: field 'n_layer': says 1000000000000 layers but the weights hold 2"),
    (empty_safetensors, "model.safetensors: corrupt or truncated safetensors file"),
    (truncated_bin, "pytorch_model.bin: corrupt or truncated PyTorch weights"),
    (index_names_missing_shard, "names shard 'model-00002-of-00002.safetensors', which is missing"),
    (tokenizer_without_eos, "the tokenizer has no EOS token"),
    (tokenizer_json_corrupt, "cannot load its tokenizer"),
]


def load_for_generation(model_dir: Path):
    """What `alignloop generate` does with --model: the tokenizer, then the model sized to it."""
    tokenizer = load_tokenizer(model_dir)
    return tokenizer, load_causal_lm(model_dir, "cpu", tokenizer)


@pytest.mark.parametrize("breaker,message", BROKEN_MODEL_DIRS, ids=[b.__name__ for b, _ in BROKEN_MODEL_DIRS])
def test_broken_model_dir_refused_in_one_line(tmp_path, tiny_lm_dir, breaker, message):
    model_dir = copy_model(tiny_lm_dir, tmp_path / "model")
    breaker(model_dir)
    with pytest.raises(InputError) as err:
        load_for_generation(model_dir)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert text.startswith(str(model_dir)), text


def test_model_dir_check_reads_only_the_header(tmp_path, tiny_lm_dir):
    """A whole 4 GiB safetensors file (sparse: no disk used) is checked in well under a second."""
    import struct
    import time

    model_dir = copy_model(tiny_lm_dir, tmp_path / "model")
    size = 4 << 30
    header = json.dumps({"big": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    with (model_dir / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    start = time.perf_counter()
    assert check_model_dir(model_dir) == model_dir
    assert time.perf_counter() - start < 1.0


def test_sibling_tmp_of_missing_dir_is_named(tmp_path, tiny_lm_dir):
    copy_model(tiny_lm_dir, tmp_path / "policy.tmp")
    with pytest.raises(InputError, match=r"policy: no such model directory, but policy.tmp beside it is a half-written"):
        check_model_dir(tmp_path / "policy")


def without_a_pad_token(d: Path) -> None:
    """The tokenizer pads with EOS and has no pad token of its own, like GPT-2's."""
    tokenizer_json = d / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace("<|pad|>", "<|unused|>"))
    edit_json(d / "tokenizer_config.json", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_lm_dir) -> Path:
    from alignloop.reward.model import RewardModel, init_reward_model

    tokenizer = load_tokenizer(tiny_lm_dir)
    out = tmp_path_factory.mktemp("tiny_rm")
    return RewardModel(init_reward_model(tiny_lm_dir, tokenizer), tokenizer).save_pretrained(out)


LOADERS = {"tiny_lm_dir": lambda d, tokenizer: load_causal_lm(d, "cpu", tokenizer),
           "tiny_rm_dir": lambda d, tokenizer: load_scalar_model(d)}  # the scalar loader reads the tokenizer itself


@pytest.mark.parametrize("source_fixture", list(LOADERS))
def test_pad_equal_to_eos_gets_a_distinct_pad_that_the_model_embeds(tmp_path, request, source_fixture):
    source = request.getfixturevalue(source_fixture)
    model_dir = copy_model(source, tmp_path / "model")
    without_a_pad_token(model_dir)
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 512 != tokenizer.eos_token_id
    model = LOADERS[source_fixture](model_dir, tokenizer)
    assert model.get_input_embeddings().num_embeddings == 513  # a row for the new pad
    assert model.config.pad_token_id == 512


def test_language_model_is_no_reward_model(tiny_lm_dir):
    with pytest.raises(InputError, match=r"holds no reward/value head \(score.weight or classifier.weight\)"):
        load_scalar_model(tiny_lm_dir)


def test_reward_model_is_no_language_model(tiny_rm_dir, tmp_path, prompts_file):
    """Given as a policy, a reward model would generate from a random or repurposed LM head without a word."""
    with pytest.raises(InputError, match=r"is a reward model or critic \(GPT2ForSequenceClassification\), not a "
                                         r"language model"):
        load_causal_lm(tiny_rm_dir, "cpu")
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "alignloop", "generate", "--model", str(tiny_rm_dir), "--prompts",
                           str(prompts_file), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and not out.exists()
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tiny_rm_dir}: is a reward model or critic")


def test_tokenizer_of_another_model_refused(tmp_path, tiny_lm_dir, fortunes):
    bigger = train_tokenizer(fortunes, vocab_size=1024)
    with pytest.raises(InputError, match=r"the tokenizer has 1024 tokens but the model's embedding only 512"):
        load_causal_lm(tiny_lm_dir, "cpu", bigger)


def test_same_size_tokenizers_trained_on_different_text_differ(tmp_path, tiny_lm_dir, fortunes, tiny_tokenizer):
    other = train_tokenizer(fortunes[::-1][:1500], vocab_size=512)
    assert len(other) == len(tiny_tokenizer)  # what PPO compared: equal sizes pass that check
    with pytest.raises(InputError, match=r"reward: its tokenizer differs from .*policy's \(\d+ of 512 tokens differ\)"):
        check_same_tokenizer(Path("policy"), tiny_tokenizer, Path("reward"), other)
    check_same_tokenizer(Path("policy"), tiny_tokenizer, Path("policy2"), load_tokenizer(tiny_lm_dir))


def test_write_jsonl_leaves_nothing_when_rows_fail(tmp_path):
    def rows():
        yield {"prompt": "a"}
        raise InputError("p.jsonl", "bad", line=2)

    with pytest.raises(InputError):
        write_jsonl(tmp_path / "out.jsonl", rows())
    assert list(tmp_path.iterdir()) == []


def test_write_jsonl_to_a_directory_is_one_line(tmp_path):
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(InputError, match=r"out.jsonl: cannot write it \(it is a directory; give a file name\)"):
        write_jsonl(tmp_path / "out.jsonl", [{"prompt": "a"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# ---- the same through the real `alignloop generate`, as a user runs it --------------------------------
# (the cases, a half-written directory and a good run; the runs go concurrently: each pays
# torch's import)

def good_prompts(case_dir: Path) -> Path:
    prompts = case_dir / "p.jsonl"
    prompts.write_text('{"prompt": "The"}\n{"prompt": "A"}\n')
    return prompts


def not_utf8_prompts(case_dir: Path) -> Path:
    prompts = case_dir / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    return prompts


# name: (what breaks the model directory, what writes the prompts, what the one error line says)
GENERATE_ERRORS = {
    "prompts_not_utf8": (None, not_utf8_prompts, "p.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)"),
    "config_without_weights": (config_without_weights, good_prompts, "no weight files"),
    "truncated_safetensors": (truncated_safetensors, good_prompts, "corrupt or truncated safetensors file"),
    "no_tokenizer_files": (no_tokenizer_files, good_prompts, "no tokenizer files"),
    "tmp_leftover": (tmp_leftover, good_prompts, "half-written model directory"),
}
GOOD_RUN = (None, good_prompts, None)


@pytest.fixture(scope="module")
def generate_runs(tmp_path_factory, tiny_lm_dir) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    procs = {}
    for name, (breaker, write_prompts, _) in {**GENERATE_ERRORS, "good": GOOD_RUN}.items():
        case = tmp_path_factory.mktemp(name)
        model_dir = tiny_lm_dir
        if breaker is not None:
            model_dir = copy_model(tiny_lm_dir, case / "model")
            breaker(model_dir)
        out = case / "out" / "o.jsonl"
        args = [ALIGNLOOP, "generate", "--model", str(model_dir), "--prompts", str(write_prompts(case)),
                "--out", str(out), "--max-new-tokens", "4", "--greedy"]
        procs[name] = (subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    runs = {}
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        runs[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return runs


@pytest.mark.parametrize("case", list(GENERATE_ERRORS))
def test_cli_generate_bad_input_one_line_nothing_written(generate_runs, case):
    result, out = generate_runs[case]
    assert_one_line_error(result, "error:", GENERATE_ERRORS[case][2])
    assert result.stderr.startswith("error:")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no output, not even a .tmp


def test_cli_generate_good_input_still_works(generate_runs):
    result, out = generate_runs["good"]
    assert result.returncode == 0, result.stderr
    assert [r["prompt"] for r in read_jsonl(out)] == ["The", "A"]


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0])
def test_generate_refuses_a_temperature_that_is_not_a_finite_positive_number(temperature):
    """NaN passed a `<= 0` check and sampled from NaN probabilities with rc 0."""
    from alignloop.generation import SamplingSettings

    with pytest.raises(ConfigError, match=r"temperature must be a finite number > 0"):
        SamplingSettings(temperature=temperature)
    SamplingSettings(temperature=temperature, greedy=True)  # argmax decoding never reads it


# -- limits the stages check against the model they run on -----------------------------------------

def test_generate_refuses_a_prompt_longer_than_the_context_in_one_line(tmp_path, tiny_lm_dir):
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": "short"}, {"prompt": " ".join(["word"] * 400)}])
    out = tmp_path / "o.jsonl"
    result = run_cli("generate", "--model", str(tiny_lm_dir), "--prompts", str(prompts), "--out", str(out))
    assert_one_line_error(result, "prompt 2", "128-token context", "max_new_tokens=")
    assert not out.exists()


def test_sft_max_length_past_the_model_context_is_refused_up_front(tiny_lm_dir):
    with pytest.raises(ConfigError, match=r"max_length \(192\) is longer than .*context \(128 tokens\)"):
        SFTConfig(model=tiny_lm_dir, max_length=192)


def test_ppo_refuses_a_reward_model_with_another_tokenizer_of_the_same_size(tmp_path, tiny_lm_dir, fortunes):
    import torch

    from alignloop.modeling import build_causal_lm, save_model_dir
    from alignloop.ppo import PPOConfig, PPOTrainer
    from alignloop.reward.model import RewardModel, init_reward_model

    tok = load_tokenizer(tiny_lm_dir)
    other_tok = train_tokenizer([d.upper() for d in fortunes[:3000]], vocab_size=512)
    assert len(other_tok) == len(tok) and other_tok.get_vocab() != tok.get_vocab()
    other_lm = save_model_dir(build_causal_lm(other_tok, n_layer=1, n_embd=32, n_head=2, n_positions=128),
                              other_tok, tmp_path / "other_lm")
    torch.manual_seed(0)
    rm_dir = RewardModel(init_reward_model(other_lm), load_tokenizer(other_lm)).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "p.jsonl"
    write_jsonl(prompts, [{"prompt": "Life is"}])
    config = PPOConfig(policy=tiny_lm_dir, reward_model=rm_dir, prompts=prompts, out_dir=tmp_path / "ppo", steps=1,
                       batch_size=2, mini_batch_size=2, max_new_tokens=4, precision="fp32", tensorboard=False)
    with pytest.raises(InputError, match="tokenizer differs"):
        PPOTrainer(config)


def test_reward_score_refuses_a_broken_normalization_file_in_one_line(tmp_path, tiny_rm_dir):
    rm = copy_model(tiny_rm_dir, tmp_path / "rm")
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "p", "response": "r"}])
    for text, fragment in (('{"gain": 1.0,', "not valid JSON"), ('{"gain": NaN, "bias": 0}', "field 'gain'"),
                           ('{"gain": 1.0, "bias": "0"}', "field 'bias'")):
        (rm / "reward_normalization.json").write_text(text)
        result = run_cli("reward", "score", "--reward-model", str(rm), "--data", str(data), "--out",
                         str(tmp_path / "o.jsonl"))
        assert_one_line_error(result, "reward_normalization.json", fragment)


def test_an_output_path_the_file_system_refuses_is_one_line_naming_it(tmp_path):
    """A file where a directory must go: the OS error, not a traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("demo", "--out", str(blocker / "run"))
    assert_one_line_error(result, f"error: {blocker / 'run'}", "Not a directory")
