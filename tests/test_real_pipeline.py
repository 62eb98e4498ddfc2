"""The real-data pipeline on one command: a GGUF model imported, people's ratings and chatterbot
prompts fetched into our formats, a proxy and a gold reward model (disjoint sentences), PPO with
LoRA, evaluation judged by the gold reward model; and a rerun that reuses every stage.

Everything is tiny and local (a 2-layer Llama GGUF written here, fake archives in the real
layouts); `examples/smollm2_people.yaml` is the same pipeline on the real things.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignloop.pipeline import PipelineSpec, run_pipeline
from alignloop.prompts import read_prompts
from test_realdata import write_archive, write_yaml
from test_realdata_gguf import write_tiny_llama_gguf

pytest.importorskip("gguf")


def people_sections(tmp: Path, tokenizer) -> tuple[dict, Path]:
    out = tmp / "out"
    gguf = write_tiny_llama_gguf(tmp / "tiny.gguf", tokenizer)
    archive = write_archive(tmp)
    corpus = tmp / "chatterbot"
    write_yaml(corpus / "english" / "chat.yml", "categories:\n- chat\nconversations:\n" + "".join(
        f"- - Question number {i}?\n  - Answer {i}.\n" for i in range(12)))
    hs, prompts = out / "human_sentiment", out / "prompts"
    fast = {"precision": "fp32", "device": "cpu"}
    rm = {"held_out_data": str(hs / "held_out_pairs.jsonl"), "train_layers": 1, "batch_size": 8, "lr": 1e-3,
          "normalize_samples": 8, "normalize_max_new_tokens": 8, **fast}
    return {
        "import_gguf": {"gguf": str(gguf)},
        "human_sentiment": {"archive": str(archive), "held_out_fraction": 0.25, "gold_fraction": 0.5,
                            "topics_per_domain": 4, "prompts_dir": str(prompts), "scorers": []},
        "chatterbot": {"data_dir": str(corpus), "held_out_fraction": 0.25, "prompts_dir": str(prompts)},
        "gold_reward": {"data": str(hs / "gold_train_pairs.jsonl"), **rm},
        "sample": {"prompts": str(prompts / "train"), "k": 2, "num_prompts": 4, "max_new_tokens": 8, **fast},
        "annotate": {"annotators": 1, "label_function": "vader"},
        "reward": {"data": str(hs / "train_pairs.jsonl"), **rm},
        "ppo": {"prompts": str(prompts / "train"), "steps": 2, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1,
                "max_new_tokens": 8, "lora_r": 4, "critic": "value_head", "checkpoint_every": 0,
                "tensorboard": False, "min_eos_rate": 0.0, **fast},
        "evaluate": {"prompts": str(prompts / "held_out"), "num_prompts": 8, "batch_size": 8, "num_examples": 2, **fast},
    }, out


@pytest.mark.slow
def test_real_data_pipeline_runs_every_step_itself_and_reuses_them(tmp_path, tiny_tokenizer):
    sections, out = people_sections(tmp_path, tiny_tokenizer)
    report = run_pipeline(PipelineSpec(sections, out, source="test"))
    for name, where in (("import_gguf", "model"), ("human_sentiment", "human_sentiment"), ("chatterbot", "chatterbot"),
                        ("gold_reward", "gold_reward_model")):
        assert json.loads((out / where / f"{name}_summary.json").read_text())["stage"] == name
    ppo = json.loads((out / "round1" / "policy" / "ppo_summary.json").read_text())
    evaluation = json.loads((out / "round1" / "eval" / "evaluate_summary.json").read_text())
    assert evaluation["gold_reward_model"] == str(out / "gold_reward_model")
    assert evaluation["win_rate_policy_over_sft"]["by_gold"] is not None and "gold_score_mean" in evaluation["policy"]
    # proxy and gold RMs: the frozen-trunk cache, on disjoint sentences
    proxy = json.loads((out / "round1" / "reward_model" / "reward_summary.json").read_text())
    gold = json.loads((out / "gold_reward_model" / "gold_reward_summary.json").read_text())
    assert proxy["frozen_trunk"]["train_layers"] == gold["frozen_trunk"]["train_layers"] == 1
    assert proxy["held_out_accuracy"] is not None and gold["held_out_accuracy"] is not None
    texts = lambda f: {t for r in map(json.loads, (out / "human_sentiment" / f).read_text().splitlines())
                       for t in (r["chosen"], r["rejected"])}
    assert texts("train_pairs.jsonl").isdisjoint(texts("gold_train_pairs.jsonl"))
    # prompts from both sources, held-out ones never trained on
    train, held = read_prompts(out / "prompts" / "train"), read_prompts(out / "prompts" / "held_out")
    assert any(p.startswith("Question number") for p in train) and any(p.startswith("Write a") for p in train)
    assert any(p.startswith("Question number") for p in held) and any(p.startswith("Write a") for p in held)
    assert not set(train) & set(held)
    assert (out / "policy" / "config.json").is_file() and (out / "report.html").is_file()
    assert ppo["steps"] == 2 and ppo["final_gold_score_mean"] is not None  # PPO logs the gold RM's score each step
    metrics = [json.loads(line) for line in (out / "round1" / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert all("gold_score_mean" in m for m in metrics)
    assert (out / "plots" / "ppo_gold_vs_proxy.png").is_file() and (out / "plots" / "eval_win_rate.png").is_file()
    assert report["headline"]["win_rate_policy_over_sft_by_gold"] == evaluation["win_rate_policy_over_sft"]["by_gold"]

    again = run_pipeline(PipelineSpec(sections, out, source="test"))  # a rerun: every stage reused
    assert again["rounds"][0]["evaluate"]["win_rate_policy_over_sft"] == evaluation["win_rate_policy_over_sft"]
    ran = [t["stage"] for t in again["stage_times"] if not t["reused"]]
    assert len(again["stage_times"]) == 9 and not ran, ran


def test_a_prompts_directory_reads_every_file_in_name_order(tmp_path):
    from alignloop.errors import InputError

    (tmp_path / "a.jsonl").write_text('{"prompt": "from a"}\n{"prompt": "shared"}\n')
    (tmp_path / "notes.txt").write_text("not prompts")
    (tmp_path / "b.jsonl").write_text('{"prompt": "b1"}\n{"prompt": "shared"}\n{"prompt": "b3"}\n')
    # round-robin over the files, so that a limit takes from each source
    assert read_prompts(tmp_path) == ["from a", "b1", "shared", "b3"]
    assert read_prompts(tmp_path, limit=2) == ["from a", "b1"]
    (tmp_path / "c.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(InputError, match=r"c\.jsonl:1.*prompt"):
        read_prompts(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="needs \\*.jsonl files"):
        read_prompts(empty)


def test_the_people_example_is_a_valid_pipeline_file():
    """examples/smollm2_people.yaml: every section a stage, every key and value checked as `pipeline` checks them."""
    from alignloop.pipeline import check_spec, load_pipeline_file

    spec = load_pipeline_file(Path(__file__).parent.parent / "examples" / "smollm2_people.yaml")
    check_spec(spec)
    assert set(spec.sections) == {"import_gguf", "human_sentiment", "chatterbot", "gold_reward", "sample", "annotate",
                                  "reward", "ppo", "evaluate"}
    assert spec.out == Path("runs/smollm2_people")
    # the proxy and the gold RM train on the two halves of the training sentences
    assert spec.sections["reward"]["data"].endswith("/train_pairs.jsonl")
    assert spec.sections["gold_reward"]["data"].endswith("/gold_train_pairs.jsonl")


def test_a_gold_reward_section_without_data_is_refused_before_anything_runs(tmp_path):
    from alignloop.errors import ConfigError

    spec = PipelineSpec({"import_gguf": {"gguf": str(tmp_path / "any.gguf")}, "gold_reward": {"lr": 1e-4}},
                        tmp_path / "out", source="p.yaml")
    with pytest.raises(ConfigError, match=r"p\.yaml: gold_reward\.data is needed"):
        run_pipeline(spec)
    assert not (tmp_path / "out").exists()
