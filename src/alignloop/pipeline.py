"""The whole loop on one command: pretrain -> SFT -> rounds of (sample -> annotate -> reward -> PPO -> evaluate).

`run_pipeline(sections, out, rounds)` is the API behind `alignloop pipeline --config FILE`
and `alignloop demo`. `sections` holds one mapping per stage whose keys are that stage's
config fields (`PretrainConfig`, `SFTConfig`, `SampleConfig`, `AnnotateConfig`,
`RewardTrainConfig`, `PPOConfig`, `EvaluateConfig`); a `policy: {model: DIR}` section
stands in for `sft` when the user's model is already the supervised policy.

Sources run first, once each: `import_gguf` (a GGUF model, e.g. SmolLM2, as an HF directory:
with no sft or policy section it is the supervised policy), `human_sentiment` and `chatterbot`
(real people's ratings and prompts). A `gold_reward` section (a `RewardTrainConfig`) trains,
once, a second reward model on data the policy is never trained against; every round's
evaluation is then judged by it too.

Stage-to-stage paths are wired under `out` (a path a section sets is used as given):

    out/model  out/human_sentiment  out/chatterbot   sources (once)
    out/base  out/sft                          pretrain, SFT (once)
    out/gold_reward_model                      the held-out judge (once)
    out/round<n>/prompts.jsonl                 this round's slice of the training prompts
    out/round<n>/sample/campaign.jsonl         K samples per prompt from the latest policy
    out/round<n>/annotate/                     this round's rankings and pairs (one database for all rounds)
    out/round<n>/reward_model/ (+ eval/)       RM retrained on ALL rankings so far; calibration on held-out prompts
    out/round<n>/policy/                       PPO from the last policy; the reference stays the SFT model
    out/round<n>/eval/                         policy vs SFT on held-out prompts
    out/preferences.jsonl, out/rankings.jsonl  every preference so far
    out/reward_model, out/policy               the last round's (copies)
    out/report.json, out/report.html, out/plots/

Each stage's wiring lives in its own module (`Stage.wire`); this file is the loop over them.
A stage whose summary (written last) records the same config and inputs is reused, so a
rerun resumes and a changed config reruns what it changes; `--rounds 3` after a 2-round run
adds one round. Each stage's time and the machine's load average are printed and kept in
`out/timings.json` and the report.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import StageConfig, parse_set, read_yaml_mapping
from .errors import ConfigError, InputError
from .files import atomic_directory, atomic_open, atomic_write_json, read_json_or_none
from .stage import RoundState, Stage, StageContext, load_average, log, run_stage
from .training import TrainingDiverged

SOURCES = ("import_gguf", "human_sentiment", "chatterbot")
ONCE = ("pretrain", "sft")
JUDGES = ("gold_reward",)
PER_ROUND = ("sample", "annotate", "reward", "ppo", "evaluate")
SECTIONS = SOURCES + ("pretrain", "sft", "policy") + JUDGES + PER_ROUND
TOP_LEVEL = ("out", "rounds")
MAX_ROUNDS = 1000  # each round writes models and data under out/: more is a typo, not a plan


@dataclass
class PolicyConfig(StageConfig):
    """No SFT stage: the user's model (any local HF causal LM) is the supervised policy and the reference."""

    model: Path = Path("runs/demo/sft")

    def validate(self) -> None:
        from .modeling import check_model_dir

        check_model_dir(self.model)


def stages() -> dict[str, Stage]:
    from .annotate.stage import STAGE as annotate
    from .evaluate import STAGE as evaluate
    from .gguf_import import STAGE as import_gguf
    from .ppo.trainer import STAGE as ppo
    from .pretrain import STAGE as pretrain
    from .realdata import CHATTERBOT as chatterbot, HUMAN_SENTIMENT as human_sentiment
    from .reward.train import GOLD_STAGE as gold_reward, STAGE as reward
    from .sampling import STAGE as sample
    from .sft import STAGE as sft

    return {s.name: s for s in (import_gguf, human_sentiment, chatterbot, pretrain, sft, gold_reward, sample,
                                annotate, reward, ppo, evaluate)}


def section_class(name: str) -> type[StageConfig]:
    return PolicyConfig if name == "policy" else stages()[name].config_class


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
    for name, values in sections.items():
        if name not in SECTIONS:
            raise InputError(source, f"unknown section; known: {', '.join(SECTIONS)} (and top-level "
                                     f"{', '.join(TOP_LEVEL)})", line=lines.get(name), field=name)
        if not isinstance(values, dict):
            raise InputError(source, "expected a mapping of this stage's config keys", line=lines.get(name),
                             field=name)
        cls = section_class(name)
        known = cls.known_keys()
        for key in values:
            if key not in known:
                raise InputError(source, f"unknown key for {cls.__name__}; known keys: {', '.join(sorted(known))}",
                                 line=lines.get(f"{name}.{key}"), field=f"{name}.{key}")
        cls.check_values(values, source, lines, prefix=f"{name}.")  # types and size caps, before any stage runs
    if "sft" in sections and "policy" in sections:
        raise InputError(source, "give either an sft section (train the policy) or a policy section "
                                 "(your model is the policy), not both", line=lines.get("policy"), field="policy")
    if "pretrain" in sections and "policy" in sections:
        raise InputError(source, "a pretrain section needs an sft section after it, not a policy section",
                         line=lines.get("pretrain"), field="pretrain")


def apply_sets(sections: dict[str, Any], sets: list[str] | None) -> dict[str, Any]:
    """`--set section.key=value` overrides, applied after the file. A section left empty in the file
    (`chatterbot:` with nothing under it) is a section of defaults; one that is not a mapping is kept
    as it is, for check_sections to refuse with its line."""
    out = {k: {} if v is None else dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
    for item in sets or []:
        (section, key), value = parse_set(item, parts=2)
        values = out.setdefault(section, {})
        if isinstance(values, dict):
            values[key] = value
    return out


def load_pipeline_file(path: Path, out: Path | None = None, rounds: int | None = None, human: bool = False,
                       sets: list[str] | None = None) -> PipelineSpec:
    """Read and check a pipeline YAML; `out` defaults to the file's `out:` key, else runs/<file stem>."""
    path = Path(path)
    data, lines = read_yaml_mapping(path)
    file_out, file_rounds = data.pop("out", None), data.pop("rounds", None)
    sections = apply_sets(data, sets)
    check_sections(sections, str(path), lines)
    if rounds is None and file_rounds is not None and (isinstance(file_rounds, bool) or not isinstance(file_rounds, int)):
        raise InputError(path, f"expected a whole number of rounds, got {file_rounds!r}", line=lines.get("rounds"),
                         field="rounds")
    n = rounds if rounds is not None else int(file_rounds or 1)
    return PipelineSpec(sections, Path(out or file_out or Path("runs") / path.stem), n, human, str(path))


def check_spec(spec: PipelineSpec) -> None:
    check_sections(spec.sections, spec.source)
    if not 1 <= spec.rounds <= MAX_ROUNDS:
        raise ConfigError(f"rounds must be in [1, {MAX_ROUNDS}], got {spec.rounds}")
    if spec.rounds > 1:
        for name in PER_ROUND:
            for key in ("out_dir", "out"):  # sample's `out` is the deprecated name of its output
                if key in spec.sections.get(name, {}):
                    raise ConfigError(f"{spec.source}: {name}.{key} is set, but with rounds > 1 each round writes "
                                      f"its own (under {spec.out}/round<n>/): remove {name}.{key}")
    if "gold_reward" in spec.sections and "data" not in spec.sections["gold_reward"]:
        raise ConfigError(f"{spec.source}: gold_reward.data is needed: preference pairs no other stage trains on "
                          f"(e.g. human_sentiment's gold_train_pairs.jsonl, with gold_fraction > 0)")
    if not {"sft", "policy", "import_gguf"} & set(spec.sections):
        raise ConfigError(f"{spec.source}: no sft, policy or import_gguf section: the loop needs a supervised "
                          f"policy to start from")


# -- the loop ---------------------------------------------------------------------------------------

def run_wired(stage: Stage, state: RoundState, ctx: StageContext, source: str, label: str) -> tuple[dict, dict]:
    """Build the stage's config for this round (wired from earlier outputs, the user's section over them),
    record its outputs for the stages after it, and run or reuse it; returns (config, summary)."""
    # Wiring may write files (a round's prompt slice, the reward data's split): rank 0 does, once.
    values = ctx.dist.broadcast(stage.wire(state, state.sections.get(stage.name, {})) if ctx.dist.is_main else None)
    config = stage.config_class.from_dict(values, source=f"{source} [{stage.name}]")
    state.outputs[stage.name] = stage.outputs(config)
    try:
        return config.to_dict(), run_stage(stage, config, ctx, label=label, reuse=True)
    except TrainingDiverged as e:  # the guard stopped the run: say so where the report looks, then stop
        if ctx.dist.is_main:
            atomic_write_json(state.out / "guards.json", [{"stage": label, "guard": "non-finite loss or gradients",
                                                            "what": str(e)}])
        raise


def run_pipeline(spec: PipelineSpec) -> dict:
    """Run (or resume) every stage; returns the report (also written to out/report.json and report.html)."""
    check_spec(spec)
    out, sections = Path(spec.out), spec.sections
    ctx, started, registry = StageContext(), time.time(), stages()
    main = ctx.dist.is_main  # under several processes: rank 0 writes the run's own files and says what happens
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "guards.json").unlink(missing_ok=True)  # what stopped an earlier invocation is not this one's
        log(f"pipeline: {spec.rounds} round(s) under {out} (load average {load_average()}, "
            f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"{ctx.dist.world_size} process(es))")
    state = RoundState(out, 1, sections, {}, spec.human, sections.get("ppo", {}).get("max_new_tokens"))
    configs: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    for name in (n for n in SOURCES + ONCE if n in sections):
        configs[name], summaries[name] = run_wired(registry[name], state, ctx, spec.source, label=name)
        if name == "import_gguf" and not {"sft", "policy"} & set(sections):
            state.outputs["policy"] = {"model": state.outputs[name]["model"]}  # the imported model is the policy
    if "policy" in sections:  # after the sources: it may name the model one of them wrote
        policy = PolicyConfig.from_dict(sections["policy"], source=f"{spec.source} [policy]")
        configs["policy"], state.outputs["policy"] = policy.to_dict(), {"model": Path(policy.model)}
    for name in (n for n in JUDGES if n in sections):
        configs[name], summaries[name] = run_wired(registry[name], state, ctx, spec.source, label=name)
    rounds: list[dict] = []
    for n in range(1, spec.rounds + 1):
        state.round = n
        record: dict[str, Any] = {"round": n}
        configs[f"round{n}"] = {}
        for name in PER_ROUND:
            configs[f"round{n}"][name], record[name] = run_wired(registry[name], state, ctx, spec.source,
                                                                 label=f"round{n}/{name}")
        record.update(ppo_metrics=str(state.outputs["ppo"]["metrics"]),
                      eval_dir=str(state.outputs["evaluate"]["samples"].parent),
                      reward_dir=str(state.outputs["reward"]["model"]))
        rounds.append(record)
        if main:
            publish_round(state)
            report = write_pipeline_report(spec, ctx, summaries, rounds, configs, time.time() - started)
    if main:
        log(f"pipeline: done in {time.time() - started:.1f} s; report: {out / 'report.html'}")
    return ctx.dist.broadcast(report if main else None)  # every process returns rank 0's report


def publish_round(state: RoundState) -> None:
    """The latest round's models and every preference so far at the top of out/, where users look first."""
    annotate = state.outputs["annotate"]
    for src, name in ((annotate["all_rankings"], "rankings.jsonl"), (annotate["all_preferences"], "preferences.jsonl")):
        with atomic_open(state.out / name) as out, open(src, encoding="utf-8") as source:
            shutil.copyfileobj(source, out)
    copy_model_dir(state.outputs["ppo"]["model"], state.out / "policy")
    copy_model_dir(state.outputs["reward"]["model"], state.out / "reward_model")


def copy_model_dir(src: Path, dst: Path) -> None:
    """Replace dst with src's model files (not PPO's optimizer checkpoint: the round directory keeps it), atomically."""
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint", "tensorboard"))


def write_pipeline_report(spec: PipelineSpec, ctx: StageContext, summaries: dict, rounds: list[dict],
                          configs: dict, seconds: float) -> dict:
    """report.json / report.html, and out/timings.json: each stage's time, kept across reruns."""
    from .report import pipeline_report

    path = Path(spec.out) / "timings.json"
    timings = read_json_or_none(path) or {}
    timings.update({t["stage"]: {k: v for k, v in t.items() if k not in ("stage", "reused")}
                    for t in ctx.timings if not t["reused"]})
    atomic_write_json(path, timings)
    stage_times = [{**timings.get(t["stage"], {}), **t} for t in ctx.timings]
    return pipeline_report(Path(spec.out), summaries, rounds, configs, stage_times, seconds, spec)
