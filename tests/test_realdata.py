"""Human-sentiment pairs, lexicon agreement and chatterbot prompts, on tiny fake archives with the real layout.

No test here downloads anything except `test_real_fetch_*` (slow; skipped when
pip cannot reach the index).
"""

from __future__ import annotations

import io
import json
import random
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from alignloop.errors import InputError
from alignloop.jsonl import read_jsonl
from alignloop.labelers import BUILTIN, load_label_function
from alignloop.realdata import (
    DOMAIN_PROMPTS,
    HumanSentimentConfig,
    Sentence,
    agreement,
    chatterbot_prompts,
    human_sentiment,
    make_pairs,
    read_chatterbot_file,
    read_human_ratings,
    sampled_vote,
    split_by_sentence,
    vote_share,
)

STEMS = ["tweets", "movieReviewSnippets", "nytEditorialSnippets", "amazonReviewSnippets"]
WORDS = {2: "wonderful great day", 1: "good enough", 0: "a table", -1: "rather dull", -2: "awful terrible mess"}


def fake_rows(stem: str, n: int = 12) -> list[tuple[str, list[int], str]]:
    """(id, ratings, text): sentences whose ratings (and words) run from very positive to very negative."""
    rng = random.Random(stem)
    rows = []
    for i in range(n):
        level = 2 - (i % 5)
        ratings = [max(-4, min(4, level + rng.choice([-1, 0, 0, 1]))) for _ in range(20)]
        rows.append((f"{i // 3 + 1}_{i % 3 + 1}", ratings, f"{stem} {i}: {WORDS[level]}"))
    return rows


def ratings_line(sid: str, ratings: list[int], mean: float | None = None) -> str:
    mean = statistics.fmean(ratings) if mean is None else mean
    return f"{sid}\t{mean}\t{statistics.pstdev(ratings):.5f}\t{ratings}"


def write_archive(root: Path, overrides: dict[str, str] | None = None, sdist: bool = True,
                  text_mean_shift: dict[str, float] | None = None) -> Path:
    """hutto_ICWSM_2014.tar.gz (inside a fake vaderSentiment sdist) with four domains; `overrides` replaces files."""
    files = {}
    for stem in STEMS:
        rows = fake_rows(stem)
        shift = text_mean_shift or {}
        # BOM + CRLF as in the real amazon file
        files[f"{stem}_anonDataRatings.txt"] = "\ufeff" + "\r\n".join(ratings_line(s, r) for s, r, _ in rows)
        files[f"{stem}_GroundTruth.txt"] = "\r\n".join(
            f"{s}\t{statistics.fmean(r) + shift.get(s, 0.0)}\t{t}" for s, r, t in rows)
    files.update(overrides or {})
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if not sdist:
        path = root / "hutto_ICWSM_2014.tar.gz"
        path.write_bytes(inner.getvalue())
        return path
    path = root / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


# -- parsing -------------------------------------------------------------------
def test_reads_every_rating_from_sdist_or_inner_archive(tmp_path):
    for sdist in (True, False):
        sentences, dropped = read_human_ratings(write_archive(tmp_path, sdist=sdist))
        assert len(sentences) == 4 * 12 and dropped == dict.fromkeys(DOMAIN_PROMPTS, 0)
        first = next(s for s in sentences if s.domain == "amazon_reviews" and s.id == "1_1")
        assert first.ratings == fake_rows("amazonReviewSnippets")[0][1]  # the BOM did not eat the id
        assert first.text == "amazonReviewSnippets 0: wonderful great day"  # no trailing \r


def test_sentence_whose_two_files_disagree_on_the_mean_is_dropped(tmp_path):
    sentences, dropped = read_human_ratings(write_archive(tmp_path, text_mean_shift={"2_1": 0.8}))
    assert dropped == {"tweets": 1, "movie_reviews": 1, "nyt_editorials": 1, "amazon_reviews": 1}
    assert not any(s.id == "2_1" for s in sentences)


@pytest.mark.parametrize("bad_line, field, fragment", [
    ("1_1\t0.5\t0.5\t[1, 0, oops]", "ratings", "expected a list"),
    ("1_1\t0.5\t0.5\t[1, 0, 9]", "ratings", "rating 9 is not an integer in -4..4"),
    ("1_1\tabc\t0.5\t[1, 0]", "mean", "expected a number"),
    ("1_1\t3.0\t0.5\t[1, 0]", "mean", "disagrees with the mean of its ratings"),
    ("1_1\t0.5\t[1, 0]", None, "expected 4 tab-separated fields"),
])
def test_malformed_ratings_row_names_file_line_and_field(tmp_path, bad_line, field, fragment):
    rows = fake_rows("nytEditorialSnippets")
    lines = [ratings_line(s, r) for s, r, _ in rows[1:]]
    text = "\n".join(lines[:4] + [bad_line] + lines[4:])  # the bad row is line 5
    archive = write_archive(tmp_path, {"nytEditorialSnippets_anonDataRatings.txt": text})
    with pytest.raises(InputError) as err:
        read_human_ratings(archive)
    assert err.value.line == 5 and err.value.field == field
    assert err.value.path.endswith("hutto_ICWSM_2014/nytEditorialSnippets_anonDataRatings.txt")
    assert fragment in str(err.value)


def test_text_without_ratings_row_is_an_error(tmp_path):
    text = "\n".join(f"{s}\t{statistics.fmean(r)}\t{t}" for s, r, t in fake_rows("tweets")) + "\n99\t0.0\tan orphan"
    with pytest.raises(InputError, match="id '99' has no row") as err:
        read_human_ratings(write_archive(tmp_path, {"tweets_GroundTruth.txt": text}))
    assert err.value.line == 13 and err.value.field == "id"


def test_archive_without_ratings_files_is_an_error(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("x/readme.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(InputError, match="holds neither"):
        read_human_ratings(path)


# -- splits, votes, pairs --------------------------------------------------------
def sentences_for(domain: str, means_and_texts: list[tuple[list[int], str]]) -> list[Sentence]:
    return [Sentence(domain, str(i), t, r) for i, (r, t) in enumerate(means_and_texts)]


def test_split_is_by_sentence_text_per_domain():
    group = sentences_for("tweets", [([i % 9 - 4], f"t{i % 40}") for i in range(80)])  # every text twice
    group += sentences_for("movie_reviews", [([1], f"m{i}") for i in range(50)])
    train, held = split_by_sentence(group, 0.2, seed=0)
    assert {s.text for s in train}.isdisjoint({s.text for s in held})
    assert sum(s.domain == "tweets" for s in held) == 2 * 8  # 20 % of 40 distinct texts, both copies
    assert sum(s.domain == "movie_reviews" for s in held) == 10


def test_vote_share_hand_computed():
    assert vote_share([2, 0], [1, 1]) == 0.5  # 2>1 twice, 0<1 twice
    assert vote_share([1, 1], [1, 0]) == 0.75  # two ties (half each) and two wins, of four
    assert vote_share([4], [-4]) == 1.0


def test_sampled_vote_follows_the_real_vote_share():
    rng = random.Random(0)
    a, b = [3, 1, 0, -1], [0, 0, 1, -2]  # vote share of a: 0.625
    votes = [sampled_vote(a, b, rng) for _ in range(4000)]
    assert abs(votes.count(0) / len(votes) - vote_share(a, b)) < 0.03


def test_majority_pairs_prefer_the_higher_mean_within_a_domain():
    group = sentences_for("tweets", [([i - 4] * 3, f"t{i}") for i in range(9)])
    group += sentences_for("nyt_editorials", [([i - 4, i - 3], f"n{i}") for i in range(8)])
    pairs = make_pairs(group, random.Random(0), pairs_per_sentence=2, min_mean_gap=1.5, label="majority")
    assert len(pairs) > 10
    for p in pairs:
        assert p["chosen_mean"] - p["rejected_mean"] == pytest.approx(p["mean_gap"]) and p["mean_gap"] >= 1.5
        assert p["chosen"][0] == p["rejected"][0] == p["domain"][0]  # never across domains
        assert p["prompt"] == DOMAIN_PROMPTS[p["domain"]] and p["agrees_with_majority"]
        assert statistics.fmean(p["chosen_votes"]) == pytest.approx(p["chosen_mean"], abs=1e-4)
    assert len({(p["chosen_id"], p["rejected_id"], p["domain"]) for p in pairs}) == len(pairs)  # no pair twice


def test_sampled_vote_labels_carry_real_disagreement():
    # every sentence's ratings straddle its neighbours': one person often disagrees with the crowd
    group = sentences_for("tweets", [([i - 3, i - 2, i - 1, i, i + 1], f"t{i}") for i in range(-2, 5)])
    rng = random.Random(1)
    pairs = make_pairs(group, rng, pairs_per_sentence=3, min_mean_gap=0.5, label="sampled-vote")
    flipped = [p for p in pairs if not p["agrees_with_majority"]]
    assert 0 < len(flipped) < len(pairs) / 2
    for p in flipped:  # the flip puts the lower-mean sentence first
        assert p["chosen_mean"] < p["rejected_mean"]
    clear = sentences_for("tweets", [([4] * 5, "great"), ([-4] * 5, "awful")])
    pairs = make_pairs(clear, random.Random(0), 1, 0.5, "sampled-vote")
    assert all(p["chosen"] == "great" for p in pairs)  # unanimous people never flip


def test_agreement_counts_ties_half():
    pairs = [{"prompt": "", "chosen": c, "rejected": r, "domain": d}
             for c, r, d in [("3", "1", "a"), ("1", "3", "a"), ("2", "2", "a"), ("5", "0", "b")]]
    table = agreement(pairs, lambda ps, rs: [float(r) for r in rs])
    assert table["a"] == {"agreement": 0.5, "tie_rate": round(1 / 3, 4), "pairs": 3}  # (1 + 0 + 0.5) / 3
    assert table["b"]["agreement"] == 1.0 and table["all"]["agreement"] == 0.625
    assert list(table)[-1] == "all"


def test_afinn_is_a_builtin_label_function():
    assert load_label_function("afinn") is BUILTIN["afinn"]
    assert BUILTIN["afinn"](["", "", ""], ["good", "bad", "a table"]) == [3.0, -3.0, 0.0]  # AFINN-en-165 valences


# -- the stage ---------------------------------------------------------------------
def test_human_sentiment_writes_pairs_splits_and_agreement(tmp_path):
    archive = write_archive(tmp_path)
    out = tmp_path / "out"
    summary = human_sentiment(HumanSentimentConfig(out_dir=out, archive=archive, label="sampled-vote",
                                                   held_out_fraction=0.25, pairs_per_sentence=2, min_mean_gap=0.5))
    train = read_jsonl(out / "train_pairs.jsonl", {"prompt": str, "chosen": str, "rejected": str})
    held = read_jsonl(out / "held_out_pairs.jsonl", {"prompt": str, "chosen": str, "rejected": str})
    assert summary["train_pairs"] == len(train) and summary["held_out_pairs"] == len(held) > 0
    assert all(p["label"] == "majority" and p["agrees_with_majority"] for p in held)
    assert all(p["label"] == "sampled-vote" for p in train)
    held_texts = {t for p in held for t in (p["chosen"], p["rejected"])}
    assert held_texts.isdisjoint({t for p in train for t in (p["chosen"], p["rejected"])})
    for domain in DOMAIN_PROMPTS:
        per_domain = read_jsonl(out / f"held_out_pairs.{domain}.jsonl")
        assert per_domain and all(p["domain"] == domain for p in per_domain)
    table = json.loads((out / "agreement.json").read_text())
    assert set(table) == {"one_person", "vader", "afinn"}
    # the fake sentences' words follow their ratings, so both lexicons agree with people well above chance
    assert table["vader"]["all"]["agreement"] > 0.8 and table["afinn"]["all"]["agreement"] > 0.8
    assert (out / "alignloop_humansentimentconfig.yaml").is_file()


def test_held_out_pairs_do_not_depend_on_the_training_label_mode(tmp_path):
    archive = write_archive(tmp_path)
    for label in ("majority", "sampled-vote"):
        human_sentiment(HumanSentimentConfig(out_dir=tmp_path / label, archive=archive, label=label, scorers=[],
                                             held_out_fraction=0.3))
    assert (tmp_path / "majority" / "held_out_pairs.jsonl").read_text() == \
        (tmp_path / "sampled-vote" / "held_out_pairs.jsonl").read_text()


def test_gold_split_shares_no_sentence_with_the_proxy_or_held_out_pairs(tmp_path):
    archive = write_archive(tmp_path)
    plain = human_sentiment(HumanSentimentConfig(out_dir=tmp_path / "plain", archive=archive, scorers=[],
                                                 held_out_fraction=0.25))
    summary = human_sentiment(HumanSentimentConfig(out_dir=tmp_path / "gold", archive=archive, scorers=[],
                                                   held_out_fraction=0.25, gold_fraction=0.5))
    texts = lambda name: {t for p in read_jsonl(tmp_path / "gold" / name) for t in (p["chosen"], p["rejected"])}
    proxy, gold, held = texts("train_pairs.jsonl"), texts("gold_train_pairs.jsonl"), texts("held_out_pairs.jsonl")
    assert gold and proxy and proxy.isdisjoint(gold) and held.isdisjoint(gold) and held.isdisjoint(proxy)
    assert all(p["label"] == "majority" for p in read_jsonl(tmp_path / "gold" / "gold_train_pairs.jsonl"))
    assert summary["gold_train_pairs"] == len(read_jsonl(tmp_path / "gold" / "gold_train_pairs.jsonl"))
    # the held-out split does not move when a gold split is asked for
    assert (tmp_path / "gold" / "held_out_pairs.jsonl").read_text() == (tmp_path / "plain" / "held_out_pairs.jsonl").read_text()
    assert plain["gold_train_pairs"] == 0 and not (tmp_path / "plain" / "gold_train_pairs.jsonl").exists()
    splits = {r["split"] for r in read_jsonl(tmp_path / "gold" / "sentences.jsonl")}
    assert splits == {"train", "gold", "held_out"}


def test_topic_prompts_come_from_the_data_and_hold_out_whole_topics():
    from alignloop.realdata import topic_prompts

    texts = ["the camera battery died", "great camera, awful battery", "my camera works", "the battery and the lens",
             "lens cap lost", "using the lens", "the screen is bright", "screen glare"]
    sentences = [Sentence("amazon_reviews", str(i), t, [1, 2]) for i, t in enumerate(texts)]
    train, held = topic_prompts(sentences, per_domain=4, held_out_fraction=0.25, seed=0)
    topics = [p["topic"] for p in train + held]
    # commonest first (camera, battery, lens in 3 sentences each; screen in 2); 'great', 'awful' are
    # sentiment words, 'using' a verb form, 'works' a function word: never topics
    assert sorted(topics) == ["battery", "camera", "lens", "screen"] and len(held) == 1
    assert all(p["prompt"] == f"Write a sentence from a product review about {p['topic']}." for p in train + held)
    assert not {p["topic"] for p in held} & {p["topic"] for p in train}


def test_cli_human_sentiment_and_agreement(tmp_path):
    from typer.testing import CliRunner

    from alignloop.cli import app

    archive = write_archive(tmp_path)
    runner = CliRunner()
    run = runner.invoke(app, ["data", "human-sentiment", "--archive", str(archive), "--out-dir", str(tmp_path / "o"),
                              "--set", "held_out_fraction=0.3"])
    assert run.exit_code == 0, run.output
    table = runner.invoke(app, ["data", "agreement", "--pairs", str(tmp_path / "o" / "held_out_pairs.jsonl"),
                                "--scorer", "afinn"])
    assert table.exit_code == 0, table.output
    assert table.stdout.startswith("| domain | held-out pairs | one_person | afinn |")
    assert "| all |" in table.stdout


def test_cli_bad_archive_row_is_one_line(tmp_path):
    archive = write_archive(tmp_path, {"tweets_anonDataRatings.txt": "1\t0.5\t0.1\t[1, 0"})
    run = subprocess.run([sys.executable, "-m", "alignloop", "data", "human-sentiment", "--archive", str(archive),
                          "--out-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "tweets_anonDataRatings.txt:1: field 'ratings'" in lines[0]


# -- chatterbot -------------------------------------------------------------------------
def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_chatterbot_turns_become_prompt_response_pairs(tmp_path):
    root = tmp_path / "data"
    write_yaml(root / "english" / "greetings.yml",
               "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n  - How are you?\n- - Hello\n  - Hey\n")
    write_yaml(root / "english" / "trivia.yml",
               "categories:\n- trivia\nconversations:\n- - 2 + 2?\n  - 4\n- just a string, not a conversation\n")
    summary = chatterbot_prompts(tmp_path / "out", data_dir=root, held_out_fraction=0.34)
    pairs = read_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert [(p["prompt"], p["response"]) for p in pairs] == [
        ("Hello", "Hi"), ("Hi", "How are you?"), ("Hello", "Hey"), ("2 + 2?", "4")]
    prompts = [r["prompt"] for r in read_jsonl(tmp_path / "out" / "prompts.jsonl")]
    assert prompts == ["Hello", "Hi", "2 + 2?"]
    held = read_jsonl(tmp_path / "out" / "held_out_prompts.jsonl")
    train = read_jsonl(tmp_path / "out" / "train_prompts.jsonl")
    assert len(held) == 1 and len(train) == 2 and {r["prompt"] for r in held + train} == set(prompts)
    assert summary["skipped_malformed"] == ["english/trivia.yml:conversation 2"]


def test_chatterbot_malformed_yaml_names_file_and_line(tmp_path):
    bad = write_yaml(tmp_path / "bad.yml", "conversations:\n- - Hello\n  - [unclosed\n")
    with pytest.raises(InputError) as err:
        read_chatterbot_file(bad)
    assert err.value.path == str(bad) and err.value.line is not None
    strict = write_yaml(tmp_path / "strict.yml", "conversations:\n- a string\n")
    with pytest.raises(InputError, match="conversation 1 is not a list"):
        read_chatterbot_file(strict)


def test_installed_chatterbot_corpus_converts(tmp_path):
    pytest.importorskip("chatterbot_corpus")
    summary = chatterbot_prompts(tmp_path)
    assert summary["pairs"] > 2000 and summary["prompts"] > 900  # the real English corpus


# -- the real archive (network) ---------------------------------------------------------
@pytest.mark.slow
def test_real_fetch_of_vader_ratings(tmp_path):
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "vadersentiment==3.3.2", "-d", str(tmp_path / "cache"), "--quiet"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach the index: {probe.stderr.strip()[-200:]}")
    summary = human_sentiment(HumanSentimentConfig(out_dir=tmp_path, scorers=["afinn"]))
    # the published counts: 4,200 tweets (199 dropped, see read_human_ratings), 10,605 + 5,190 + 3,708 snippets
    assert summary["sentences"] == {"amazon_reviews": 3708, "movie_reviews": 10605, "nyt_editorials": 5190,
                                    "tweets": 4001}
    assert summary["dropped_inconsistent"]["tweets"] == 199


def test_smollm2_example_sections_match_stage_configs():
    """examples/smollm2.yaml: one section per stage, every key a field of that stage's config."""
    import dataclasses
    import importlib
    import inspect

    import yaml

    example = yaml.safe_load((Path(__file__).parent.parent / "examples" / "smollm2.yaml").read_text())
    assert set(example) == {"policy", "sample", "annotate", "reward", "ppo", "evaluate"}
    for section, target in [("sample", "alignloop.sampling:SampleConfig"),
                            ("reward", "alignloop.reward.train:RewardTrainConfig"),
                            ("ppo", "alignloop.ppo.config:PPOConfig"),
                            ("evaluate", "alignloop.evaluate:EvaluateConfig"),
                            ("annotate", "alignloop.annotate.simulate:run_simulated_annotation")]:
        module, name = target.split(":")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue  # that stage has not landed in this checkout
        known = ({f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj)
                 else set(inspect.signature(obj).parameters))
        assert set(example[section]) <= known, (section, set(example[section]) - known)
    assert example["ppo"]["steps"] >= 20 and example["ppo"]["lora_r"] > 0
    measured = yaml.safe_load((Path(__file__).parent.parent / "examples" / "smollm2_ppo_measured.yaml").read_text())
    try:
        from alignloop.ppo.config import PPOConfig
    except ImportError:
        return
    assert set(measured) <= {f.name for f in dataclasses.fields(PPOConfig)}


def test_subsample_pairs_caps_each_domain(tmp_path):
    from alignloop.jsonl import write_jsonl
    from alignloop.realdata import subsample_pairs

    rows = [{"prompt": "", "chosen": f"{d}{i}", "rejected": "x", "domain": d} for d, n in [("a", 10), ("b", 3)]
            for i in range(n)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert subsample_pairs(tmp_path / "p.jsonl", tmp_path / "s.jsonl", 4) == {"a": 4, "b": 3}
    kept = read_jsonl(tmp_path / "s.jsonl")
    assert len({r["chosen"] for r in kept}) == 7


def test_reward_model_scores_a_repeated_sentence_once(rm_dir):
    """In the human pairs each sentence sits in several pairs: the RM runs on each distinct text once."""
    from alignloop.reward.model import RewardModel

    rm = RewardModel.from_pretrained(rm_dir, torch.device("cpu"), "fp32")
    rows_scored = []
    score_ids = rm.score_ids
    rm.score_ids = lambda ids, mask, normalize: rows_scored.append(len(ids)) or score_ids(ids, mask, normalize)
    prompts = ["p", "p", "p", "q"]
    responses = ["longer one", "short", "longer one", "short"]
    repeated = rm.score(prompts, responses)
    assert sum(rows_scored) == 3  # ("p", "longer one") once
    assert repeated[0] == repeated[2]
    one_by_one = [rm.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert repeated == pytest.approx(one_by_one, abs=1e-5)
