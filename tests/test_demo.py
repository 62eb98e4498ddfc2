"""The whole loop end to end on a tiny config: outputs, per-round report, resume; the HTML in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from alignloop.errors import AlignloopError, InputError
from alignloop.pipeline import PipelineSpec, load_pipeline_file, run_pipeline
from alignloop.sampling import round_prompts
from alignloop.splits import hash_held_out, hash_split

ROOT = Path(__file__).parent.parent
CHROMIUM = Path("/usr/bin/chromium")


LABEL = """
def distinct_letters(prompts, responses):
    # A barely trained model writes few sentiment words, so VADER ties most of its texts;
    # this judge ties rarely and is cheap.
    return [float(len(set(r.lower()))) for r in responses]
"""


def tiny_sections(corpus: Path) -> dict:
    """Every stage, as small as still means something: a 1-layer model, a few PPO steps."""
    judge = f"{corpus.parent / 'label.py'}:distinct_letters"
    (corpus.parent / "label.py").write_text(LABEL)
    return {
        "pretrain": {"corpus": str(corpus), "vocab_size": 320, "n_layer": 1, "n_embd": 32, "n_head": 2,
                     "block_size": 32, "batch_size": 16, "epochs": 0.3, "warmup_steps": 2},
        "sft": {"corpus": str(corpus), "batch_size": 16, "epochs": 0.2, "warmup_steps": 2, "max_length": 96},
        "sample": {"k": 3, "num_prompts": 12, "batch_size": 36},
        "annotate": {"annotators": 2, "overlap": 2, "noise": 0.1, "label_function": judge},
        "reward": {"epochs": 1.0, "batch_size": 8, "normalize_samples": 8, "held_out_fraction": 0.25},
        "ppo": {"steps": 2, "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 12,
                "checkpoint_every": 0, "tensorboard": False, "min_eos_rate": 0.0},
        "evaluate": {"num_prompts": 8, "batch_size": 8, "num_examples": 4, "judge": judge},
    }


def tiny_fp32_cpu_sections(directory: Path, fortunes: list[str]) -> dict:
    """`tiny_sections` on a corpus of 600 fortunes written to `directory`, every model stage in fp32 on
    the CPU (the same sums in every run, whatever the bf16 probe would pick)."""
    corpus = directory / "corpus.txt"
    corpus.write_text("\n\n".join(fortunes[:600]) + "\n")
    sections = tiny_sections(corpus)
    for name, section in sections.items():
        if name != "annotate":
            section.update(precision="fp32", device="cpu")
    return sections


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fortunes):
    base = tmp_path_factory.mktemp("demo")
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join(f for f in fortunes[:600]) + "\n")
    out = base / "out"
    report = run_pipeline(PipelineSpec(tiny_sections(corpus), out, rounds=2, source="test"))
    return out, report, corpus


@pytest.mark.slow
def test_whole_loop_writes_every_output_and_a_report_per_round(tiny_run):
    out, report, _ = tiny_run
    for d in ("sft", "reward_model", "policy", "round1/policy", "round2/policy"):
        assert (out / d / "config.json").is_file(), d
    for f in ("preferences.jsonl", "rankings.jsonl", "report.json", "report.html", "timings.json"):
        assert (out / f).is_file(), f
    # Every stage records the process's peak memory so far (it never falls from one stage to the next)
    # and what it held when the stage ended (at most the peak).
    stages = json.loads((out / "timings.json").read_text()).values()
    peaks = [t["peak_memory_gib_so_far"] for t in stages]
    assert peaks and all(p > 0 for p in peaks) and peaks == sorted(peaks), peaks
    assert all(0 < t["memory_gib_after"] <= t["peak_memory_gib_so_far"] + 0.01 for t in stages), list(stages)
    # The RM of round 2 saw every ranking of rounds 1 and 2: 12 prompts x 2 annotators each round.
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 2 * 12 * 2
    assert {r["campaign"].split("-")[0] for r in rankings} == {"campaign"}
    assert len({r["campaign"] for r in rankings}) == 2
    # Rounds sample different prompts (a slice each), from the latest policy.
    r1 = (out / "round1/prompts.jsonl").read_text()
    r2 = (out / "round2/prompts.jsonl").read_text()
    assert r1 != r2
    assert json.loads((out / "round2/sample/campaign.jsonl").read_text().splitlines()[0])["meta"]["model"] == \
        str(out / "round1/policy")
    saved = json.loads((out / "report.json").read_text())
    assert saved["headline"]["rounds"] == 2
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    for r in saved["rounds"]:
        assert set(r) == {"round", "sample", "annotate", "reward", "ppo", "evaluate"}
        assert r["sample"]["items"] >= 1 and r["annotate"]["answers"] == 24
        assert 0 <= r["reward"]["held_out_accuracy"] <= 1 and r["reward"]["held_out_ece"] is not None
        assert r["ppo"]["steps"] == 2
        assert 0 <= r["evaluate"]["win_rate_policy_over_sft"]["by_judge"] <= 1
        assert r["evaluate"]["prompts"] == 8
    assert set(saved["configs"]) == {"pretrain", "sft", "round1", "round2"}
    # Round 2's PPO started from round 1's policy while its reference stayed the SFT model.
    assert saved["configs"]["round2"]["ppo"]["init_policy"] == str(out / "round1/policy")
    assert saved["configs"]["round2"]["ppo"]["policy"] == str(out / "sft")
    assert len([s for s in saved["stage_times"] if not s["reused"]]) == 2 + 2 * 5
    html = (out / "report.html").read_text()
    for img in ("ppo_score.png", "ppo_kl.png", "ppo_entropy.png", "ppo_length.png", "ppo_frontier.png",
                "rm_accuracy.png", "round1_rm_calibration.png", "round2_rm_calibration.png", "eval_win_rate.png",
                "eval_frontier.png"):
        assert f"plots/{img}" in html and (out / "plots" / img).stat().st_size > 1000, img
    assert "policy, round 2" in html  # the side-by-side examples have a column per round


@pytest.mark.slow
def test_rerun_reuses_every_stage_and_adds_a_round(tiny_run, capfd):
    out, _, corpus = tiny_run
    before = (out / "round2/policy/model.safetensors").stat().st_mtime
    report = run_pipeline(PipelineSpec(tiny_sections(corpus), out, rounds=2, source="test"))
    assert all(s["reused"] for s in report["stage_times"])
    assert "reusing" in capfd.readouterr().err
    assert (out / "round2/policy/model.safetensors").stat().st_mtime == before
    assert report["rounds"] == json.loads((out / "report.json").read_text())["rounds"]
    # --rounds 3 after a 2-round run: rounds 1-2 reused, round 3 runs from round 2's policy.
    report = run_pipeline(PipelineSpec(tiny_sections(corpus), out, rounds=3, source="test"))
    ran = [s["stage"] for s in report["stage_times"] if not s["reused"]]
    assert ran == [f"round3/{s}" for s in ("sample", "annotate", "reward", "ppo", "evaluate")]
    assert report["configs"]["round3"]["ppo"]["init_policy"] == str(out / "round2/policy")
    assert len(report["rounds"]) == 3


@pytest.mark.slow
def test_a_changed_config_reruns_that_stage_and_what_depends_on_it(tiny_run, capfd):
    """Resume checks each stage's config and inputs, not only that its summary exists."""
    out, _, corpus = tiny_run
    sections = tiny_sections(corpus)
    sections["evaluate"]["num_prompts"] = 6
    report = run_pipeline(PipelineSpec(sections, out, rounds=3, source="test"))
    ran = [s["stage"] for s in report["stage_times"] if not s["reused"]]
    assert ran == ["round1/evaluate", "round2/evaluate", "round3/evaluate"]
    assert "config or inputs changed" in capfd.readouterr().err
    assert all(r["evaluate"]["prompts"] == 6 for r in report["rounds"])
    # A summary cut short by a kill is not taken for a finished stage.
    summary = out / "round3/eval/evaluate_summary.json"
    summary.write_text(summary.read_text()[:40])
    report = run_pipeline(PipelineSpec(sections, out, rounds=3, source="test"))
    assert [s["stage"] for s in report["stage_times"] if not s["reused"]] == ["round3/evaluate"]


def test_pipeline_file_errors_name_file_line_and_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("policy:\n  model: x\nppo:\n  stepz: 3\n")
    with pytest.raises(InputError, match=r"p.yaml:4: field 'ppo.stepz': unknown key for PPOConfig"):
        load_pipeline_file(bad)
    bad.write_text("polcy:\n  model: x\n")
    with pytest.raises(InputError, match=r"p.yaml:1: field 'polcy': unknown section"):
        load_pipeline_file(bad)
    bad.write_text("sft: {}\npolicy:\n  model: x\n")
    with pytest.raises(InputError, match="either an sft section"):
        load_pipeline_file(bad)
    # A section that is not a mapping is refused at its line, with or without --set into it.
    for value in ("[1, 2]", "3", "text"):
        bad.write_text(f"policy:\n  model: x\nppo: {value}\n")
        for sets in (None, ["ppo.steps=2"]):
            with pytest.raises(InputError, match=r"p.yaml:3: field 'ppo': expected a mapping"):
                load_pipeline_file(bad, sets=sets)
    # A section with nothing under it is a section of defaults.
    bad.write_text("policy:\n  model: x\nchatterbot:\nevaluate:\n")
    spec = load_pipeline_file(bad, sets=["evaluate.num_prompts=4"])
    assert spec.sections["chatterbot"] == {} and spec.sections["evaluate"] == {"num_prompts": 4}
    for where, what in ((tmp_path, "a directory, not a config file"), (Path("/dev/null"), "not a regular file"),
                        (tmp_path / "none.yaml", "no such config file")):
        with pytest.raises(InputError, match=what):
            load_pipeline_file(where)
    for key in ("out_dir: s", "out: c.jsonl"):  # out: the deprecated name of sample's output
        bad.write_text(f"policy:\n  model: x\nsample:\n  {key}\n")
        with pytest.raises(AlignloopError, match=f"sample.{key.split(':')[0]} is set, but with rounds > 1"):
            run_pipeline(load_pipeline_file(bad, out=tmp_path / "o", rounds=2))


def test_smollm2_example_loads_as_a_pipeline_with_its_own_paths():
    spec = load_pipeline_file(ROOT / "examples" / "smollm2.yaml")
    assert spec.out == Path("runs/smollm2") and spec.rounds == 1
    assert spec.sections["ppo"]["lora_r"] > 0


def test_sets_override_sections(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("rounds: 2\npolicy:\n  model: m\nppo:\n  steps: 5\n")
    spec = load_pipeline_file(f, sets=["ppo.steps=7", "evaluate.judge=afinn"])
    assert spec.rounds == 2 and spec.sections["ppo"]["steps"] == 7 and spec.sections["evaluate"]["judge"] == "afinn"


def test_round_prompts_slices_and_wraps(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    got = lambda n: [json.loads(line)["prompt"] for line in round_prompts(src, tmp_path / f"r{n}.jsonl", n, 3)
                     .read_text().splitlines()]
    assert got(1) == ["p0", "p1", "p2"]
    assert got(2) == ["p3", "p4", "p0"]  # wraps around the end


def test_hash_split_holds_out_the_same_prompts_as_the_data_grows():
    prompts = [f"prompt {i}" for i in range(200)]
    _, held_small = hash_split(prompts[:100], 0.2)
    _, held_large = hash_split(prompts, 0.2)
    assert held_small and set(held_small) <= set(held_large)  # once held out, always held out
    assert all(hash_held_out(p, 0.2) for p in held_large)
    assert hash_split(["a", "b"], 0.0) == (["b"], ["a"])  # too few to hash: one prompt is held out anyway


def test_human_mode_serves_the_app_and_waits_for_people(tmp_path):
    """--human: the campaign is served, tokens given out; the stage returns once people answered every item."""
    from alignloop.annotate.simulate import random_answerer, run_http_annotators
    from alignloop.annotate.stage import AnnotateConfig, human_annotation

    campaign = tmp_path / "campaign.jsonl"
    campaign.write_text("".join(json.dumps({"item_id": f"i{i}", "prompt": f"p{i}", "responses": ["a", "b", "c"]})
                                + "\n" for i in range(4)))
    db = f"sqlite:///{tmp_path / 'a.db'}"
    cfg = AnnotateConfig(campaign=campaign, out_dir=tmp_path / "ann", db_url=db, human=True, annotators=2, overlap=2,
                         port=0, poll_seconds=0.2)
    seen = {}

    def people(base: str, tokens: dict[str, str]) -> None:
        seen.update(tokens)
        people_tokens = [t for who, t in tokens.items() if who != "admin"]
        threading.Thread(target=run_http_annotators, args=(base, people_tokens, 1, 8, random_answerer),
                         daemon=True).start()

    summary = human_annotation(cfg, on_ready=people)
    assert set(seen) == {"admin", "annotator-1", "annotator-2"}
    assert summary["answers"] == 8 and summary["items"] == 4
    rows = (tmp_path / "ann" / "all_rankings.jsonl").read_text().splitlines()
    assert len(rows) == 8


@pytest.mark.browser
@pytest.mark.slow
def test_report_renders_in_chromium_with_every_image(tiny_run):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    out, _, _ = tiny_run
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((out / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
        assert len(images) >= 10
        assert all(width > 0 for _, width in images), [src for src, w in images if w == 0]
        assert page.locator("h2", has_text="rounds").count() == 1
        assert page.locator("th", has_text="round 2").count() >= 5
        # docs/img/report.png shows the demo's own report (make demo, or $ALIGNLOOP_REPORT_DIR) when one
        # exists; without it the tiny run's page is shot to a temporary file, leaving the docs' picture alone.
        shot = out.parent / "report.png"
        demo = Path(os.environ.get("ALIGNLOOP_REPORT_DIR", ROOT / "runs" / "demo")) / "report.html"
        if demo.is_file():
            page.goto(demo.resolve().as_uri())
            page.wait_for_load_state("load")
            assert all(w > 0 for w in page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)"))
            shot = ROOT / "docs" / "img" / "report.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000


def test_wiring_refuses_bad_section_values_in_one_line(tmp_path, tiny_lm_dir):
    """Values the pipeline's wiring reads itself are checked as strictly as the configs check theirs."""
    f, prompts = tmp_path / "p.yaml", tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Life is"}\n')
    head = f"policy:\n  model: {tiny_lm_dir}\nsample:\n  prompts: {prompts}\n"
    for text, message in ((f"rounds: 1000000\n{head}", r"rounds must be in \[1, 1000\]"),
                          (f"{head}  num_prompts: lots\n", r"p\.yaml:5: field 'sample\.num_prompts': expected a whole number"),
                          (f"{head}  num_prompts: 0\n", r"sample.num_prompts \(prompts per round\) must be >= 1"),
                          (f"{head}  seed: x\n", r"p\.yaml:5: field 'sample\.seed': expected a whole number")):
        f.write_text(text)
        with pytest.raises(AlignloopError, match=message):
            run_pipeline(load_pipeline_file(f, out=tmp_path / "o"))
