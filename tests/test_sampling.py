"""`alignloop sample`: K distinct responses per prompt, written as a campaign."""

from __future__ import annotations

import json

import pytest

from alignloop.errors import ConfigError
from alignloop.jsonl import read_jsonl
from alignloop.sampling import SampleConfig, item_id, sample_campaign


def test_campaign_has_k_distinct_responses_and_settings(tmp_path, tiny_lm_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Life is", "Cats", "Life is", "Time flies"]))
    s = sample_campaign(SampleConfig(model=tiny_lm_dir, prompts=prompts, out_dir=tmp_path, k=3, max_new_tokens=10,
                                     temperature=1.5))
    out = tmp_path / "campaign.jsonl"
    assert s["out"] == str(out) and (tmp_path / "sample_summary.json").is_file()
    items = read_jsonl(out, required={"item_id": str, "prompt": str, "responses": list, "meta": dict})
    assert [i["prompt"] for i in items] == ["Life is", "Cats", "Time flies"]  # the duplicate prompt merged
    for item in items:
        assert len(item["responses"]) == 3 == len(set(item["responses"]))
        assert item["item_id"] == item_id(item["prompt"])
        assert item["meta"]["k"] == 3 and item["meta"]["temperature"] == 1.5
    assert s["items"] == 3 and s["responses"] == 9


def test_greedy_like_sampling_that_repeats_drops_the_prompt(tmp_path, tiny_lm_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Same"}) + "\n")
    # Near-zero temperature: every draw is the argmax, so only one distinct response exists.
    s = sample_campaign(SampleConfig(model=tiny_lm_dir, prompts=prompts, out=tmp_path / "c.jsonl", k=2,
                                     temperature=1e-4, max_new_tokens=6, max_resample=1))
    assert s["items"] == 0 and s["dropped_prompts"] == 1
    assert s["out"] == str(tmp_path / "c.jsonl")  # the deprecated `out` still names the campaign file


def test_k_below_two_rejected(tmp_path, tiny_lm_dir):
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="k must be >= 2"):
        SampleConfig(model=tiny_lm_dir, prompts=tmp_path / "p.jsonl", k=1)
