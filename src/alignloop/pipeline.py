"""The whole loop on one command: pretrain -> SFT -> rounds of (sample -> annotate -> reward -> PPO -> evaluate).

`run_pipeline(sections, out, rounds)` is the API behind `alignloop pipeline --config FILE`
and `alignloop demo`. `sections` holds one mapping per stage whose keys are that stage's
config fields (`PretrainConfig`, `SFTConfig`, `SampleConfig`, `AnnotateConfig`,
`RewardTrainConfig`, `PPOConfig`, `EvaluateConfig`); a `policy: {model: DIR}` section
stands in for `sft` when the user's model is already the supervised policy.

Stage-to-stage paths are wired under `out` (a path a section sets is used as given):

    out/base  out/sft                          pretrain, SFT (once)
    out/round<n>/prompts.jsonl                 this round's slice of the training prompts
    out/round<n>/campaign.jsonl                K samples per prompt from the latest policy
    out/round<n>/annotate/                     this round's rankings and pairs (one database for all rounds)
    out/round<n>/reward_model/ (+ eval/)       RM retrained on ALL rankings so far; calibration on held-out prompts
    out/round<n>/policy/                       PPO from the last policy; the reference stays the SFT model
    out/round<n>/eval/                         policy vs SFT on held-out prompts
    out/preferences.jsonl, out/rankings.jsonl  every preference so far
    out/reward_model, out/policy               the last round's (copies)
    out/report.json, out/report.html, out/plots/

A stage whose output (its summary file, written last) exists is reused, so a rerun
resumes; `--rounds 3` after a 2-round run adds one round. Each stage's time and the
machine's load average are printed and kept in `out/timings.json` and the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import StageConfig
from .errors import ConfigError, InputError
from .jsonl import read_jsonl, write_jsonl

STAGES = ("pretrain", "sft", "policy", "sample", "annotate", "reward", "ppo", "evaluate")
TOP_LEVEL = ("out", "rounds")
# Outputs a section may pin only for a single round (each round writes its own).
ROUND_OUTPUTS = {"sample": "out", "annotate": "out_dir", "reward": "out_dir", "ppo": "out_dir", "evaluate": "out_dir"}


@dataclass
class AnnotateConfig(StageConfig):
    """The annotate stage: simulated people (a label function plus noise) or, with `human`, the web app."""

    campaign: Path | None = None  # wired: this round's campaign.jsonl
    out_dir: Path | None = None  # wired: out/round<n>/annotate
    label_function: str = "vader"  # 'vader', 'afinn', 'module:function' or 'file.py:function'
    annotators: int = 3
    overlap: int = 1  # answers per item (> 1 gives inter-annotator agreement figures)
    noise: float = 0.1  # share of random answers of a simulated person
    mode: str = "rank"  # 'rank' (all K at once) or 'pairwise'
    seed: int = 0
    db_url: str | None = None  # wired: sqlite:///out/annotations.db, shared by every round
    human: bool = False  # serve the app and wait for people instead of simulating them
    host: str = "127.0.0.1"
    port: int = 8000
    poll_seconds: float = 5.0

    def validate(self) -> None:
        from .labelers import load_label_function

        self.require(self.annotators >= 1 and self.overlap >= 1, "annotators and overlap must be >= 1")
        self.require(self.overlap <= self.annotators, f"overlap ({self.overlap}) cannot exceed annotators "
                                                      f"({self.annotators}): one person answers an item once")
        self.require(0 <= self.noise <= 1, "noise is a share of answers, in [0, 1]")
        self.require(self.mode in ("rank", "pairwise"), f"mode must be 'rank' or 'pairwise', got '{self.mode}'")
        if not self.human:
            load_label_function(self.label_function)  # fail now, not after sampling


@dataclass
class PolicyConfig(StageConfig):
    """No SFT stage: the user's model (any local HF causal LM) is the supervised policy and the reference."""

    model: Path = Path("runs/demo/sft")


def stage_classes() -> dict[str, type[StageConfig]]:
    from .evaluate import EvaluateConfig
    from .ppo import PPOConfig
    from .pretrain import PretrainConfig
    from .reward.train import RewardTrainConfig
    from .sampling import SampleConfig
    from .sft import SFTConfig

    return {"pretrain": PretrainConfig, "sft": SFTConfig, "policy": PolicyConfig, "sample": SampleConfig,
            "annotate": AnnotateConfig, "reward": RewardTrainConfig, "ppo": PPOConfig, "evaluate": EvaluateConfig}


# -- the pipeline file ---------------------------------------------------------------------------

@dataclass
class PipelineSpec:
    sections: dict[str, dict[str, Any]]
    out: Path
    rounds: int = 1
    human: bool = False
    source: str = "pipeline"


def check_sections(sections: dict[str, Any], source: str = "pipeline", lines: dict[str, int] | None = None) -> None:
    """Every section a known stage, every key a field of its config: caught before any stage runs."""
    lines = lines or {}
    classes = stage_classes()
    for name, values in sections.items():
        if name not in classes:
            raise InputError(source, f"unknown section; known: {', '.join(STAGES)} (and top-level "
                                     f"{', '.join(TOP_LEVEL)})", line=lines.get(name), field=name)
        if not isinstance(values, dict):
            raise InputError(source, "expected a mapping of this stage's config keys", line=lines.get(name),
                             field=name)
        known = {f.name for f in dataclasses.fields(classes[name]) if f.init}
        for key in values:
            if key not in known:
                raise InputError(source, f"unknown key for {classes[name].__name__}; known keys: "
                                         f"{', '.join(sorted(known))}", line=lines.get(f"{name}.{key}"),
                                 field=f"{name}.{key}")
    if "sft" in sections and "policy" in sections:
        raise InputError(source, "give either an sft section (train the policy) or a policy section "
                                 "(your model is the policy), not both", line=lines.get("policy"), field="policy")
    if "pretrain" in sections and "policy" in sections:
        raise InputError(source, "a pretrain section needs an sft section after it, not a policy section",
                         line=lines.get("pretrain"), field="pretrain")


def apply_sets(sections: dict[str, dict], sets: list[str] | None) -> dict[str, dict]:
    """`--set section.key=value` overrides, applied after the file."""
    out = {k: dict(v) for k, v in sections.items()}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--set '{item}' is not of the form section.key=value (e.g. ppo.steps=50)")
        out.setdefault(section, {})[field] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_pipeline_file(path: Path, out: Path | None = None, rounds: int | None = None, human: bool = False,
                       sets: list[str] | None = None) -> PipelineSpec:
    """Read and check a pipeline YAML; `out` defaults to the file's `out:` key, else runs/<file stem>."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such pipeline file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(path, f"not valid YAML ({getattr(e, 'problem', e)})",
                         line=None if mark is None else mark.line + 1) from None
    if not isinstance(data, dict):
        raise InputError(path, "expected one mapping per stage at the top level")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[k.value] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for kk, _ in v.value:
                    lines[f"{k.value}.{kk.value}"] = kk.start_mark.line + 1
    file_out, file_rounds = data.pop("out", None), data.pop("rounds", None)
    sections = apply_sets(data, sets)
    check_sections(sections, str(path), lines)
    n = rounds if rounds is not None else int(file_rounds or 1)
    return PipelineSpec(sections, Path(out or file_out or Path("runs") / path.stem), n, human, str(path))


# -- bookkeeping: reuse, times, load --------------------------------------------------------------

def log(message: str) -> None:
    print(f"[alignloop] {message}", file=sys.stderr, flush=True)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class Timings:
    """Seconds and load average of every stage, kept in out/timings.json across reruns."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.this_run: list[dict] = []

    def run(self, key: str, label: str, done: Path, fn: Callable[[], dict]) -> dict:
        """Run `fn` unless `done` (the stage's summary file, written last) exists; record and print its time."""
        if done.is_file():
            summary = json.loads(done.read_text())
            entry = self.entries.get(key) or {"seconds": summary.get("seconds"), "load_before": None,
                                              "load_after": None}
            entry = {**entry, "reused": True}
            log(f"{label}: reusing {done.parent} (took {_secs(entry['seconds'])} when it ran)")
        else:
            before, start = load_average(), time.time()
            log(f"{label}: running (load average {before})")
            summary = fn()
            seconds = time.time() - start
            entry = {"seconds": round(seconds, 2), "load_before": before, "load_after": load_average(),
                     "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "reused": False}
            self.entries[key] = {k: v for k, v in entry.items() if k != "reused"}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.entries, indent=2))
            log(f"{label}: done in {_secs(seconds)} (load average {entry['load_before']} -> {entry['load_after']})")
        self.this_run.append({"stage": key, **entry})
        return summary


def _secs(s: float | None) -> str:
    return "?" if s is None else f"{s:.1f} s"


def _write_summary(path: Path, summary: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


# -- helpers the stages need ----------------------------------------------------------------------

def round_prompts(source: Path, out: Path, round_index: int, per_round: int | None) -> Path:
    """Round n samples prompts [(n-1)·N, n·N) of the training prompts (wrapping), so rounds see new prompts."""
    from .sampling import read_prompts

    prompts = read_prompts(source)
    if per_round is None or per_round >= len(prompts):
        chosen = prompts
    else:
        start = ((round_index - 1) * per_round) % len(prompts)
        chosen = (prompts + prompts)[start:start + per_round]
    write_jsonl(out, ({"prompt": p} for p in chosen))
    return out


def held_out_prompt(prompt: str, fraction: float) -> bool:
    """A stable by-prompt split: the same prompt is held out in every round and every rerun."""
    h = int(hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def split_rankings(rows: list[dict], out_dir: Path, fraction: float) -> tuple[Path, Path, dict]:
    """Every ranking so far -> train / held-out files split by prompt (the RM never sees a held-out prompt)."""
    train = [r for r in rows if not held_out_prompt(r["prompt"], fraction)]
    held = [r for r in rows if held_out_prompt(r["prompt"], fraction)]
    if not train or not held:  # tiny runs: keep at least one prompt on each side
        prompts = sorted({r["prompt"] for r in rows})
        if len(prompts) < 2:
            raise ConfigError("the reward model needs rankings on at least two prompts (one held out)")
        held_set = set(prompts[: max(1, int(len(prompts) * fraction))])
        train = [r for r in rows if r["prompt"] not in held_set]
        held = [r for r in rows if r["prompt"] in held_set]
    paths = out_dir / "train_rankings.jsonl", out_dir / "held_out_rankings.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], held)
    return paths[0], paths[1], {"train_rankings": len(train), "held_out_rankings": len(held)}


def copy_model_dir(src: Path, dst: Path) -> None:
    """Replace dst with src's model files (not PPO's optimizer checkpoint: the round directory keeps it)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoint", "tensorboard"))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def ppo_from(config, init_policy: Path | None) -> dict:
    """PPO whose policy starts from `init_policy` (the last round's) while the reference stays `config.policy`.

    The trainer loads `config.policy` for both; the weights of the last round are copied in
    before the first step (a resumed run then loads its own checkpoint over them).
    """
    from .ppo import PPOTrainer

    trainer = PPOTrainer(config)
    if init_policy is not None:
        if config.lora_r > 0:
            # LoRA: the reference is the base with adapters off, so carry over the adapters alone.
            from peft import load_peft_weights, set_peft_model_state_dict

            set_peft_model_state_dict(trainer.policy, load_peft_weights(str(Path(init_policy) / "adapter")))
        else:
            from .modeling import load_causal_lm

            last = load_causal_lm(init_policy, trainer.device, trainer.tokenizer)
            trainer.load_policy_weights(last.state_dict())
            del last
    return trainer.train()


# -- human annotation -------------------------------------------------------------------------------

def human_annotation(cfg: AnnotateConfig, campaign_file: Path, out_dir: Path, db_url: str,
                     on_ready: Callable[[str, dict[str, str]], None] | None = None) -> dict:
    """Import the campaign, serve the app, print its address and sign-in links, wait until every item
    has its `overlap` answers, then export this round's and every round's answers."""
    from sqlalchemy import select

    from .annotate import campaign_progress
    from .annotate import service
    from .annotate.app import BackgroundServer
    from .annotate.db import Annotator, Campaign, get_sessionmaker
    from .annotate.export import ranking_rows, write_exports

    start = time.time()
    Session = get_sessionmaker(db_url)
    tokens: dict[str, str] = {}
    with Session() as s:
        name = service.campaign_name(campaign_file)  # same naming as the simulated path: a rerun finds it
        camp = s.scalar(select(Campaign).where(Campaign.name == name))
        if camp is None:
            camp = service.create_campaign(s, name, service.read_campaign_file(campaign_file), cfg.mode,
                                           cfg.overlap, source=str(campaign_file))
        campaign_id = camp.id
        for who, admin in [("admin", True)] + [(f"annotator-{i + 1}", False) for i in range(cfg.annotators)]:
            if s.scalar(select(Annotator).where(Annotator.name == who)) is None:
                tokens[who] = service.create_annotator(s, who, admin)
    with BackgroundServer(db_url, cfg.host, cfg.port) as base:
        log(f"annotate: campaign {campaign_id} ({name}) is open at {base}/  (admin page: {base}/admin)")
        for who, token in tokens.items():
            log(f"annotate:   {who}: {base}/{'admin' if who == 'admin' else ''}#token={token}")
        if not tokens:
            log("annotate:   (the annotators exist from an earlier round; their tokens were shown then; "
                "`alignloop annotate add-annotator NAME --db ...` makes another)")
        if on_ready is not None:
            on_ready(base, tokens)
        last = None
        while True:
            done, total = campaign_progress(db_url, campaign_id)
            if (done, total) != last:
                log(f"annotate: {done}/{total} answers")
                last = (done, total)
            if done >= total:
                break
            time.sleep(cfg.poll_seconds)
    with Session() as s:
        stats = service.campaign_stats(s, campaign_id)
        this = write_exports(ranking_rows(s, [campaign_id]), out_dir)
        every = write_exports(ranking_rows(s), out_dir, prefix="all_")
    return {"stage": "annotate", "people": "human", "campaign": campaign_id, "campaign_name": name, "db": db_url,
            "items": stats["items"], "answers": stats["answers"], "pairs": this["pairs"],
            "agreement": stats["agreement"], "position_bias": stats["position_bias"],
            "all_rankings": every["rankings"], "all_pairs": every["pairs"], "seconds": round(time.time() - start, 2)}


# -- the loop ---------------------------------------------------------------------------------------

def _config(name: str, wired: dict[str, Any], user: dict[str, Any], source: str) -> StageConfig:
    """Wired paths first, the user's section over them; built (and so validated) just before the stage runs."""
    cls = stage_classes()[name]
    return cls.from_dict({**wired, **user}, source=f"{source} [{name}]")


def _unless_set(user: dict, key: str, value: Any) -> dict:
    return {} if key in user else {key: value}


def run_pipeline(spec: PipelineSpec) -> dict:
    """Run (or resume) every stage; returns the report (also written to out/report.json and report.html)."""
    sections, out, source = spec.sections, Path(spec.out), spec.source
    check_sections(sections, source)
    if spec.rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {spec.rounds}")
    if spec.rounds > 1:
        for name, key in ROUND_OUTPUTS.items():
            if key in sections.get(name, {}):
                raise ConfigError(f"{source}: {name}.{key} is set, but with rounds > 1 each round writes its own "
                                  f"(under {out}/round<n>/): remove {name}.{key}")
    if "sft" not in sections and "policy" not in sections:
        raise ConfigError(f"{source}: no sft or policy section: the loop needs a supervised policy to start from")
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out)
    configs: dict[str, Any] = {}
    started = time.time()
    log(f"pipeline: {spec.rounds} round(s) under {out} (load average {load_average()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")

    # -- once: base model and SFT policy --------------------------------------------------------------
    summaries: dict[str, Any] = {}
    if "pretrain" in sections:
        from .pretrain import pretrain

        user = sections["pretrain"]
        cfg = _config("pretrain", {"out_dir": out / "base"}, user, source)
        configs["pretrain"] = cfg.to_dict()
        summaries["pretrain"] = timings.run("pretrain", "pretrain", Path(cfg.out_dir) / "pretrain_summary.json",
                                            lambda: pretrain(cfg))
    if "sft" in sections:
        from .sft import sft

        user = sections["sft"]
        wired = {"out_dir": out / "sft"}
        if "pretrain" in sections:
            wired["model"] = Path(configs["pretrain"]["out_dir"])
        cfg = _config("sft", wired, user, source)
        configs["sft"] = cfg.to_dict()
        summaries["sft"] = timings.run("sft", "sft", Path(cfg.out_dir) / "sft_summary.json", lambda: sft(cfg))
        sft_dir = Path(cfg.out_dir)
        train_prompts, held_prompts = sft_dir / "train_prompts.jsonl", sft_dir / "held_out_pairs.jsonl"
    else:
        policy_cfg = _config("policy", {}, sections["policy"], source)
        configs["policy"] = policy_cfg.to_dict()
        sft_dir = Path(policy_cfg.model)
        train_prompts = held_prompts = None  # the user's sample/ppo/evaluate sections must name their prompts

    def prompts_for(stage: str, default: Path | None) -> Path:
        user = sections.get(stage, {})
        if "prompts" in user:
            return Path(user["prompts"])
        if default is None:
            raise ConfigError(f"{source}: {stage}.prompts is needed (no sft section to take prompts from)")
        return default

    # The same response budget in every stage, so the policy is judged on what it was trained to write.
    ppo_user = sections.get("ppo", {})
    from .ppo import PPOConfig

    max_new = ppo_user.get("max_new_tokens", PPOConfig.__dataclass_fields__["max_new_tokens"].default)
    annotate_user = {k: v for k, v in sections.get("annotate", {}).items()}
    human = spec.human or bool(annotate_user.get("human", False))
    db_url = annotate_user.get("db_url") or f"sqlite:///{(out / 'annotations.db').resolve()}"

    rounds: list[dict] = []
    last_policy: Path | None = None  # None: round 1 starts from the SFT model
    for n in range(1, spec.rounds + 1):
        rdir = out / f"round{n}"
        tag = f"round {n}"
        record: dict[str, Any] = {"round": n}
        round_configs: dict[str, Any] = {}

        # 2a. sample K responses per prompt from the latest policy
        from .sampling import sample_campaign

        user = dict(sections.get("sample", {}))
        per_round = user.pop("num_prompts", None)
        source_prompts = prompts_for("sample", train_prompts)
        user.pop("prompts", None)
        prompt_file = rdir / "prompts.jsonl"
        wired = {"model": last_policy or sft_dir, "prompts": prompt_file, "out": rdir / "campaign.jsonl",
                 "seed": user.pop("seed", 0) + 1000 * (n - 1), **_unless_set(user, "max_new_tokens", max_new)}
        campaign_out = Path(user.get("out", wired["out"]))
        if not Path(str(campaign_out) + ".summary.json").is_file():
            round_prompts(source_prompts, prompt_file, n, per_round)
        elif not prompt_file.is_file():
            prompt_file = source_prompts  # a pinned campaign from elsewhere: its prompts file is the user's
            wired["prompts"] = prompt_file
        cfg = _config("sample", wired, user, source)
        round_configs["sample"] = {**cfg.to_dict(), "num_prompts_per_round": per_round}
        record["sample"] = timings.run(f"round{n}/sample", f"{tag} sample", Path(str(cfg.out) + ".summary.json"),
                                       lambda: sample_campaign(cfg))
        campaign = Path(cfg.out)

        # 2b. people (or simulated people) rank them
        user = sections.get("annotate", {})
        acfg = _config("annotate", {"campaign": campaign, "out_dir": rdir / "annotate", "db_url": db_url,
                                    "human": human}, user, source)
        round_configs["annotate"] = acfg.to_dict()
        ann_dir = Path(acfg.out_dir)

        def annotate(acfg=acfg, ann_dir=ann_dir) -> dict:
            if acfg.human:
                summary = human_annotation(acfg, Path(acfg.campaign), ann_dir, acfg.db_url)
            else:
                from .annotate.simulate import run_simulated_annotation

                summary = run_simulated_annotation(Path(acfg.campaign), ann_dir, acfg.label_function,
                                                   acfg.annotators, acfg.overlap, acfg.noise, acfg.mode,
                                                   acfg.seed + n - 1, acfg.db_url)
            return _write_summary(ann_dir / "annotate_summary.json", summary)

        record["annotate"] = timings.run(f"round{n}/annotate", f"{tag} annotate",
                                         ann_dir / "annotate_summary.json", annotate)
        # Everything answered so far, in every round: the RM's data, and the user's copy at out/.
        all_rankings = read_jsonl(ann_dir / "all_rankings.jsonl")
        shutil.copyfile(ann_dir / "all_rankings.jsonl", out / "rankings.jsonl")
        shutil.copyfile(ann_dir / "all_preferences.jsonl", out / "preferences.jsonl")

        # 3. reward model, retrained from the SFT trunk on all rankings so far
        from .reward.evaluate import RewardEvalConfig, evaluate_reward_model
        from .reward.train import train_reward_model

        user = sections.get("reward", {})
        fraction = float(user.get("held_out_fraction", 0.1))
        wired = {"model": sft_dir, "out_dir": rdir / "reward_model", "held_out_fraction": fraction,
                 **_unless_set(user, "normalize_prompts", prompts_for("ppo", train_prompts)),
                 **_unless_set(user, "normalize_max_new_tokens", max_new)}
        if "data" not in user:
            train_file, held_file, split = split_rankings(all_rankings, rdir / "reward_data", fraction)
            wired.update(data=train_file, held_out_data=held_file)
        rcfg = _config("reward", wired, user, source)
        round_configs["reward"] = rcfg.to_dict()
        rm_dir = Path(rcfg.out_dir)

        def reward(rcfg=rcfg, rm_dir=rm_dir) -> dict:
            from .reward.train import SUMMARY_FILE

            summary = train_reward_model(rcfg)
            if rcfg.held_out_data is not None:  # accuracy and calibration figure on prompts it never saw
                ev = evaluate_reward_model(RewardEvalConfig(reward_model=rm_dir, data=rcfg.held_out_data,
                                                            out_dir=rm_dir / "eval", device=rcfg.device,
                                                            precision=rcfg.precision))
                summary["held_out_eval"] = {k: ev[k] for k in ("items", "comparisons", "accuracy", "loss",
                                                               "mean_margin", "calibration", "agreement",
                                                               "calibration_png")}
                summary["seconds"] += ev["seconds"]
            return _write_summary(rm_dir / SUMMARY_FILE, summary)

        record["reward"] = timings.run(f"round{n}/reward", f"{tag} reward", rm_dir / "reward_summary.json", reward)

        # 4. PPO from the last policy; the reference (and KL anchor) stays the SFT model
        user = sections.get("ppo", {})
        wired = {"policy": sft_dir, "reward_model": rm_dir, "prompts": prompts_for("ppo", train_prompts),
                 "out_dir": rdir / "policy", "seed": user.get("seed", 0) + n - 1}
        pcfg = _config("ppo", wired, {k: v for k, v in user.items() if k != "seed"}, source)
        round_configs["ppo"] = {**pcfg.to_dict(), "init_policy": str(last_policy or pcfg.policy)}
        pol_dir = Path(pcfg.out_dir)
        record["ppo"] = timings.run(f"round{n}/ppo", f"{tag} ppo", pol_dir / "ppo_summary.json",
                                    lambda: ppo_from(pcfg, last_policy))
        record["ppo_metrics"] = str(pol_dir / "metrics.jsonl")

        # 5. the policy against the SFT model on held-out prompts
        from .evaluate import evaluate

        user = sections.get("evaluate", {})
        wired = {"policy": pol_dir, "reference": sft_dir, "reward_model": rm_dir,
                 "prompts": prompts_for("evaluate", held_prompts), "out_dir": rdir / "eval",
                 **_unless_set(user, "max_new_tokens", max_new)}
        ecfg = _config("evaluate", wired, user, source)
        round_configs["evaluate"] = ecfg.to_dict()
        record["evaluate"] = timings.run(f"round{n}/evaluate", f"{tag} evaluate",
                                         Path(ecfg.out_dir) / "evaluate_summary.json", lambda: evaluate(ecfg))
        record["eval_dir"] = str(ecfg.out_dir)
        record["reward_dir"] = str(rm_dir)

        configs[f"round{n}"] = round_configs
        rounds.append(record)
        last_policy = pol_dir
        # The latest round's models at the top of out/, where users look first.
        copy_model_dir(pol_dir, out / "policy")
        copy_model_dir(rm_dir, out / "reward_model")
        from .report import pipeline_report

        pipeline_report(out, summaries, rounds, configs, timings, time.time() - started, spec)

    from .report import pipeline_report

    report = pipeline_report(out, summaries, rounds, configs, timings, time.time() - started, spec)
    log(f"pipeline: done in {_secs(time.time() - started)}; report: {out / 'report.html'}")
    return report
