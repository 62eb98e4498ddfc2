"""Bad input gives one line naming file, line and field — never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignloop.config import StageConfig
from alignloop.corpus import load_corpus
from alignloop.errors import ConfigError, InputError
from alignloop.jsonl import read_jsonl
from alignloop.sft import SFTConfig


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
