"""`alignloop compare`: several alignment methods on the same SFT model, RM, prompts and KL budgets, side by side.

From one SFT model and one reward model, each chosen method runs at each of its budgets and
seeds, and every result is judged on the same held-out prompts against the same SFT samples
(the evaluation seed is shared, so every comparison is paired prompt by prompt):

    ppo, grpo, rloo, reinforce_pp   the PPO stage with that `algorithm`; the budget is `target_kl`,
                                    which the adaptive beta steers the KL to
    dpo                             the DPO stage on the preference pairs; the budget is its beta
    best_of_n                       no training: the RM-best of N samples of the SFT model

Each training run is its own process, so its wall time and peak memory (the kernel's maxrss)
are its own. A run whose stage summary already holds this exact config is reused, and an
interrupted PPO run resumes from its checkpoint, so a rerun of `compare` continues where it
stopped. Output: `compare.json` (every run, each method's frontier, the winner per KL budget
with a paired standard error) and `compare.html` (the plots, the tables, sample completions).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import StageConfig
from .errors import AlignloopError, ConfigError
from .evaluate import STAGE as EVALUATE, EvaluateConfig, MAX_BEST_OF_N, mean_stderr, win_outcomes
from .files import atomic_write_json, atomic_write_text, read_json_or_none
from .jsonl import read_jsonl
from .modeling import check_model_dir
from .ppo.algorithms import ALGORITHMS
from .ppo.config import PPOConfig
from .ppo.trainer import STAGE as PPO
from .stage import StageContext, config_fingerprint, finished_summary, log, run_stage

ONLINE = tuple(ALGORITHMS)  # ppo, grpo, rloo, reinforce_pp
METHODS = ONLINE + ("dpo", "best_of_n")
MAX_RUNS = 500  # methods x budgets x seeds: more is a typo, not a plan


@dataclass
class CompareConfig(StageConfig):
    sft: Path = Path("runs/demo/sft")  # every method starts here; it is also the reference
    reward_model: Path = Path("runs/demo/reward_model")
    gold_reward_model: Path | None = None  # an RM no method trains against: judges over-optimisation
    prompts: Path = Path("runs/demo/sft/train_prompts.jsonl")  # the online methods' training prompts
    held_out_prompts: Path = Path("runs/demo/sft/held_out_pairs.jsonl")
    preferences: Path = Path("runs/demo/preferences.jsonl")  # DPO's pairs (the RM's training data)
    out_dir: Path = Path("runs/compare")
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    kl_budgets: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])  # nats per response
    dpo_betas: list[float] = field(default_factory=lambda: [0.3, 0.1, 0.03])
    best_of_n: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    seeds: list[int] = field(default_factory=lambda: [0])
    judge: str = "vader"
    num_prompts: int = 200
    eval_seed: int = 1234  # one seed for every evaluation: the same SFT samples on every side
    # The same settings for every online method (PPOConfig keys); then each method's own keys.
    # kl_horizon 32 lets beta move up to 20 % a step (PPOConfig's 128: 5 %), fast enough for a run to
    # settle at its budget within the demo's 30 steps instead of overshooting the low ones.
    online: dict[str, Any] = field(default_factory=lambda: {"kl_horizon": 32})
    per_method: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "grpo": {"samples_per_prompt": 4}, "rloo": {"samples_per_prompt": 4}})
    dpo: dict[str, Any] = field(default_factory=dict)  # DPO stage keys
    examples: int = 6  # held-out prompts shown side by side in compare.html

    def validate(self) -> None:
        r = self.require
        check_model_dir(self.sft)
        check_model_dir(self.reward_model)
        if self.gold_reward_model is not None:
            check_model_dir(self.gold_reward_model)
        for name in ("methods", "kl_budgets", "dpo_betas", "best_of_n", "seeds"):
            r(isinstance(getattr(self, name), list), f"{name} must be a list")
        for name in ("online", "per_method", "dpo"):
            r(isinstance(getattr(self, name), dict), f"{name} must be a mapping of config keys")
        unknown = [m for m in self.methods if m not in METHODS]
        r(not unknown, f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        r(len(set(self.methods)) == len(self.methods) and self.methods, "methods must be distinct and not empty")
        r(all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in self.kl_budgets),
          "kl_budgets must be numbers > 0 (nats per response)")
        r(all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in self.dpo_betas),
          "dpo_betas must be numbers > 0")
        r(all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_BEST_OF_N for n in self.best_of_n),
          f"best_of_n must be whole numbers in [1, {MAX_BEST_OF_N}]")
        r(all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds) and self.seeds,
          "seeds must be a non-empty list of whole numbers")
        r(set(self.per_method) <= set(ONLINE), f"per_method keys must be online methods ({', '.join(ONLINE)})")
        r(len(self.runs()) <= MAX_RUNS, f"{len(self.runs())} runs is more than {MAX_RUNS}")
        r(self.num_prompts >= 1 and self.examples >= 0, "num_prompts must be >= 1 and examples >= 0")
        for path, what in ((self.prompts, "prompts"), (self.held_out_prompts, "held_out_prompts")):
            r(Path(path).is_file(), f"{what}: no such file {path}")
        if "dpo" in self.methods:
            r(Path(self.preferences).exists(), f"preferences: no such file {self.preferences} (DPO's pairs)")
        for method in self.methods:  # a bad online setting fails now, not an hour into the comparison
            if method in ONLINE:
                PPOConfig(**online_values(self, method, self.kl_budgets[0], self.seeds[0], Path(self.out_dir)))

    def budgets(self, method: str) -> list[tuple[str, float | int]]:
        """(label, value) of each budget: target KL, DPO beta or N."""
        if method in ONLINE:
            return [(f"kl{b:g}", float(b)) for b in self.kl_budgets]
        if method == "dpo":
            return [(f"beta{b:g}", float(b)) for b in self.dpo_betas]
        return [(f"n{n}", n) for n in self.best_of_n]

    def runs(self) -> list[Run]:
        out = Path(self.out_dir)
        return [Run(method, label, value, seed, out / method / label / f"seed{seed}")
                for seed in self.seeds for method in self.methods for label, value in self.budgets(method)
                if not (method == "best_of_n" and seed != self.seeds[0])]  # best-of-N is judged once per N


@dataclass
class Run:
    method: str
    label: str  # 'kl4', 'beta0.1', 'n16'
    budget: float | int
    seed: int
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.method}/{self.label}/seed{self.seed}"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"


def online_values(config: CompareConfig, method: str, target_kl: float, seed: int, run_dir: Path) -> dict[str, Any]:
    """The PPO stage's config for one online run: the shared settings, the method's own, the budget and seed."""
    return {**config.online, **config.per_method.get(method, {}), "algorithm": method, "target_kl": target_kl,
            "seed": seed, "policy": config.sft, "reward_model": config.reward_model, "prompts": config.prompts,
            "out_dir": run_dir / "model", "tensorboard": False}


def dpo_values(config: CompareConfig, beta: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return {**config.dpo, "beta": beta, "seed": seed, "model": config.sft, "data": config.preferences,
            "out_dir": run_dir / "model", "tensorboard": False}


def stage_for(method: str):
    """(stage object, its config class, the CLI command that runs it) for a training method."""
    if method in ONLINE:
        return PPO, PPOConfig, "ppo"
    from .dpo.train import STAGE as DPO, DPOConfig

    return DPO, DPOConfig, "dpo"


# -- one training run, in its own process --------------------------------------------------------------

def train(run: Run, values: dict[str, Any]) -> dict[str, Any]:
    """Train one method (reusing a finished identical run); returns its wall time and peak memory."""
    stage, config_class, command = stage_for(run.method)
    config = config_class(**values)
    record_path = run.dir / "compare_run.json"
    record = read_json_or_none(record_path)
    fingerprint = config_fingerprint(config)
    if finished_summary(stage, config, fingerprint) is not None and isinstance(record, dict):
        return record
    run.dir.mkdir(parents=True, exist_ok=True)
    config_file = run.dir / "train.yaml"
    atomic_write_text(config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
    log(f"compare: training {run.name}")
    start = time.time()
    with open(run.dir / "train.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "alignloop", command, "--config", str(config_file)],
                                stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak memory alone
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - start
    if proc.returncode != 0:
        lines = (run.dir / "train.log").read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise AlignloopError(f"compare: {run.name} failed (exit {proc.returncode}): {lines[-1][-300:]} "
                             f"(whole log: {run.dir / 'train.log'}; rerun compare to resume)")
    summary = read_json_or_none(Path(config.out_dir) / f"{stage.name}_summary.json") or {}
    record = {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
              "resumed_from_step": summary.get("resumed_from_step"), "final_train_kl": summary.get("final_kl_mean")}
    atomic_write_json(record_path, record)
    return record


def evaluate_run(config: CompareConfig, run: Run, ctx: StageContext) -> dict[str, Any]:
    bon = run.method == "best_of_n"
    values = EvaluateConfig(policy=config.sft if bon else run.model_dir, reference=config.sft,
                            reward_model=config.reward_model, gold_reward_model=config.gold_reward_model,
                            best_of_n=int(run.budget) if bon else 1, prompts=config.held_out_prompts,
                            out_dir=run.dir / "eval", judge=config.judge, num_prompts=config.num_prompts,
                            seed=config.eval_seed)
    return run_stage(EVALUATE, values, ctx, label=f"compare/{run.name}/evaluate", reuse=True)


# -- figures -----------------------------------------------------------------------------------------

def outcomes(run: Run, by: str = "judge") -> list[float]:
    """Per held-out prompt: 1 if the run's response beat the SFT model's, 1/2 on a tie, else 0."""
    rows = read_jsonl(run.dir / "eval" / "samples.jsonl")
    return win_outcomes([r[f"policy_{by}"] for r in rows], [r[f"sft_{by}"] for r in rows])


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), mean_stderr(values)


def run_row(run: Run, trained: dict[str, Any] | None, evaluation: dict[str, Any], gold: bool) -> dict[str, Any]:
    win, win_se = mean_and_stderr(outcomes(run))
    row = {"method": run.method, "budget": run.label, "seed": run.seed, "kl": evaluation["kl_to_reference_mean"],
           "judge_win": win, "judge_win_stderr": win_se,
           "rm_win": evaluation["win_rate_policy_over_sft"]["by_rm"],
           "judge_score": evaluation["policy"]["judge_score_mean"], "rm_score": evaluation["policy"]["rm_score_mean"],
           "perplexity": evaluation["policy_perplexity_under_reference"], "eos_rate": evaluation["policy"]["eos_rate"],
           "length": evaluation["policy"]["length_mean"]}
    if gold:
        row["gold_win"] = evaluation["win_rate_policy_over_sft"]["by_gold"]
    if trained is not None:
        row.update(train_seconds=trained["seconds"], peak_rss_mb=trained["peak_rss_mb"],
                   final_train_kl=trained["final_train_kl"])
    return row


def frontier(config: CompareConfig, runs: list[Run], rows: list[dict]) -> dict[str, list[dict]]:
    """Per method and budget: KL and win rates over its seeds; the judge's win pooled over (seed, prompt)."""
    out: dict[str, list[dict]] = {}
    for method in config.methods:
        points = []
        for label, _ in config.budgets(method):
            mine = [(run, row) for run, row in zip(runs, rows) if run.method == method and run.label == label]
            pooled = [o for run, _ in mine for o in outcomes(run)]
            win, se = mean_and_stderr(pooled)
            seed_wins = [row["judge_win"] for _, row in mine]
            if len(seed_wins) > 1:  # training noise between seeds, when it is larger than the prompts' noise
                se = max(se, statistics.stdev(seed_wins) / len(seed_wins) ** 0.5)
            point = {"budget": label, "kl": statistics.fmean(row["kl"] for _, row in mine), "judge_win": win,
                     "judge_win_stderr": se, "rm_win": statistics.fmean(row["rm_win"] for _, row in mine),
                     "seeds": len(mine)}
            if config.gold_reward_model is not None:
                point["gold_win"] = statistics.fmean(row["gold_win"] for _, row in mine)
            if "train_seconds" in mine[0][1]:
                point["train_seconds"] = statistics.fmean(row["train_seconds"] for _, row in mine)
                point["peak_rss_mb"] = max(row["peak_rss_mb"] for _, row in mine)
            points.append(point)
        out[method] = points
    return out


KL_SLACK = 1.25  # a run "fits" budget b when its measured KL is at most this times b


def winners(config: CompareConfig, runs: list[Run], fronts: dict[str, list[dict]]) -> list[dict]:
    """At each KL budget: the method with the best judge win among its points within the budget, and how sure.

    Given twice: over every method, and over the methods that train a policy (best-of-N pays its
    N samples at every use instead). The margin over the runner-up is a paired difference over the
    same (seed, prompt) items against the same SFT samples, so its standard error is far smaller
    than either win rate's.
    """
    table = []
    for budget in sorted(config.kl_budgets):
        best: dict[str, dict] = {}
        for method, points in fronts.items():
            fitting = [p for p in points if p["kl"] <= KL_SLACK * budget]
            if fitting:
                best[method] = max(fitting, key=lambda p: p["judge_win"])
        trained = {m: p for m, p in best.items() if m != "best_of_n"}
        entry = {"kl_budget": budget, "overall": leader(config, runs, best), "trained": leader(config, runs, trained)}
        if entry["overall"] or entry["trained"]:
            table.append(entry)
    return table


def leader(config: CompareConfig, runs: list[Run], best: dict[str, dict]) -> dict | None:
    """The first of `best` (method -> its best point) by judge win, and its paired margin over the second."""
    if not best:
        return None
    ranked = sorted(best.items(), key=lambda kv: -kv[1]["judge_win"])
    (first, p1), rest = ranked[0], ranked[1:]
    entry = {"best": first, "best_point": p1["budget"], "judge_win": p1["judge_win"],
             "judge_win_stderr": p1["judge_win_stderr"]}
    if rest:
        second, p2 = rest[0]
        a = paired_outcomes(runs, first, p1["budget"], config.seeds)
        b = paired_outcomes(runs, second, p2["budget"], config.seeds)
        common = sorted(set(a) & set(b))
        if common:
            diff, diff_se = mean_and_stderr([a[k] - b[k] for k in common])
            entry.update(runner_up=second, runner_up_point=p2["budget"], runner_up_judge_win=p2["judge_win"],
                         margin=diff, margin_stderr=diff_se, paired_items=len(common))
    return entry


def paired_outcomes(runs: list[Run], method: str, label: str, seeds: list[int]) -> dict[tuple[int, int], float]:
    """(seed, prompt index) -> outcome. Best-of-N trains nothing, so its one evaluation pairs with every seed."""
    out = {}
    for run in runs:
        if run.method == method and run.label == label:
            for seed in (seeds if method == "best_of_n" else [run.seed]):
                out.update({(seed, i): o for i, o in enumerate(outcomes(run))})
    return out


# -- the whole comparison -----------------------------------------------------------------------------

def compare(config: CompareConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    ctx = ctx or StageContext()
    if ctx.dist.world_size > 1:  # its runs write their own records and tables: one process does them all
        raise ConfigError("alignloop compare runs in one process: launch it without torchrun or accelerate launch")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out, "compare_config.yaml")
    runs, rows = config.runs(), []
    start = time.time()
    for i, run in enumerate(runs):
        trained = None
        if run.method in ONLINE:
            trained = train(run, online_values(config, run.method, float(run.budget), run.seed, run.dir))
        elif run.method == "dpo":
            trained = train(run, dpo_values(config, float(run.budget), run.seed, run.dir))
        evaluation = evaluate_run(config, run, ctx)
        rows.append(run_row(run, trained, evaluation, config.gold_reward_model is not None))
        log(f"compare: {i + 1}/{len(runs)} {run.name}: KL {rows[-1]['kl']:.2f}, judge win {rows[-1]['judge_win']:.3f}")
    fronts = frontier(config, runs, rows)
    result = {
        "out_dir": str(out),
        "runs": rows,
        "frontier": fronts,
        "winners": winners(config, runs, fronts),
        "tuning": ("every online method ran with the same shared settings (online:) plus only the keys that "
                   "define it (per_method:), at each KL budget; DPO at each beta with its stage's defaults "
                   "(dpo:); no method was tuned further"),
        "settings": {"online": config.online, "per_method": config.per_method, "dpo": config.dpo,
                     "judge": config.judge, "held_out_prompts": config.num_prompts, "seeds": config.seeds},
        "seconds": time.time() - start,
    }
    write_compare_report(config, runs, result)
    return result


def write_compare_report(config: CompareConfig, runs: list[Run], result: dict[str, Any]) -> None:
    from .report import plot_frontiers, plot_bars, write_report

    out = Path(config.out_dir)
    fronts = result["frontier"]
    images = [plot_frontiers(out / "plots" / "judge_win_vs_kl.png", fronts, "judge_win", "judge_win_stderr",
                             f"win rate over the SFT model by the judge ({config.judge})")]
    images.append(plot_frontiers(out / "plots" / "rm_win_vs_kl.png", fronts, "rm_win", None,
                                 "win rate over the SFT model by the RM (trained against)"))
    if config.gold_reward_model is not None:
        images.append(plot_frontiers(out / "plots" / "gold_win_vs_kl.png", fronts, "gold_win", None,
                                     "win rate over the SFT model by the gold RM (held out)"))
    trained = [m for m in config.methods if fronts[m] and "train_seconds" in fronts[m][0]]
    if trained:
        images.append(plot_bars(out / "plots" / "train_seconds.png", "Wall time per training run (mean)", trained,
                                {"seconds": [statistics.fmean(p["train_seconds"] for p in fronts[m]) for m in trained]}))
        images.append(plot_bars(out / "plots" / "peak_memory.png", "Peak memory of a training process", trained,
                                {"MB": [max(p["peak_rss_mb"] for p in fronts[m]) for m in trained]}))
    write_report(out, {k: v for k, v in result.items() if k != "frontier"}, images,
                 side_by_side(config, runs), name="compare")


def side_by_side(config: CompareConfig, runs: list[Run]) -> list[dict[str, str]]:
    """The first held-out prompts: the SFT model's response and each method's at its middle budget (first seed)."""
    if not config.examples:
        return []
    columns: dict[str, list[dict]] = {}
    for method in config.methods:
        labels = [label for label, _ in config.budgets(method)]
        middle = labels[len(labels) // 2]
        run = next(r for r in runs if r.method == method and r.label == middle)
        columns[f"{method} ({middle})"] = read_jsonl(run.dir / "eval" / "samples.jsonl")[:config.examples]
    first = next(iter(columns.values()))
    return [{"prompt": row["prompt"], "sft": row["sft"], **{name: rows[i]["policy"] for name, rows in columns.items()}}
            for i, row in enumerate(first)]
