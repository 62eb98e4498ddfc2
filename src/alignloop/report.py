"""The run report: `report.json` (every figure, per round, with the configs) and `report.html`.

The HTML is one self-contained page: tables of figures, the PNG plots beside
it, and side-by-side example completions. All text from models and prompts is
escaped (a completion may contain anything).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_open, atomic_write_json, atomic_write_text, read_json_or_none  # noqa: E402
from .jsonl import read_jsonl  # noqa: E402


def save_figure(fig, path: Path, dpi: int | None = None) -> Path:
    """Lay out, write (atomically) and close a figure (closing frees it: a long run makes many)."""
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, binary=True) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    plt.close(fig)
    return path


def plot_series(path: Path, title: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str,
                ylabel: str = "") -> Path:
    """One line per named (x, y) series."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, marker="." if len(x) < 40 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)


PPO_CURVES = [
    ("Mean RM score", ("score_mean", "objective/scores"), "ppo_score.png"),
    ("KL(policy || reference) per sequence", ("kl_mean", "objective/kl"), "ppo_kl.png"),
    ("Entropy per token", ("entropy_mean", "objective/entropy"), "ppo_entropy.png"),
    ("Response length (tokens)", ("response_length_mean", "response_length"), "ppo_length.png"),
]


def _column(rows: list[dict], *names: str) -> list[float] | None:
    for name in names:
        if rows and all(name in r for r in rows):
            return [float(r[name]) for r in rows]
    return None


def plot_ppo_rounds(metrics_files: list[Path], out_dir: Path, prefix: str = "") -> list[Path]:
    """PPO curves of one or more rounds on one x axis (steps counted across rounds), one line per round.

    Rows that record a collapse (the step was undone) are left out: they are not the policy kept.
    """
    runs = []
    offset = 0
    for path in metrics_files:
        rows = [r for r in read_jsonl(path) if "collapse" not in r] if Path(path).is_file() else []
        steps = [offset + r.get("step", i + 1) for i, r in enumerate(rows)]
        runs.append((rows, steps))
        offset = steps[-1] if steps else offset
    runs = [(rows, steps) for rows, steps in runs if rows]
    if not runs:
        return []
    name = (lambda i: f"round {i + 1}") if len(metrics_files) > 1 else (lambda i: "PPO")
    plots = []
    for title, names, fname in PPO_CURVES:
        series = {name(i): (steps, y) for i, (rows, steps) in enumerate(runs)
                  if (y := _column(rows, *names)) is not None}
        if series:
            plots.append(plot_series(out_dir / f"{prefix}{fname}", title, series,
                                     "PPO step" + (" (all rounds)" if len(runs) > 1 else "")))
    points = [(k, s, steps) for rows, steps in runs
              if (k := _column(rows, "kl_mean", "objective/kl")) and (s := _column(rows, "score_mean", "objective/scores"))]
    if points:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
        all_steps = [x for _, _, st in points for x in st]
        markers = "o^sDv<>"
        for i, (kl, score, steps) in enumerate(points):
            sc = ax.scatter(kl, score, c=steps, cmap="viridis", s=14, marker=markers[i % len(markers)],
                            vmin=min(all_steps), vmax=max(all_steps), label=name(i) if len(points) > 1 else None)
        fig.colorbar(sc, ax=ax, label="PPO step")
        ax.set_xlabel("KL to reference (nats / sequence)")
        ax.set_ylabel("mean RM score")
        ax.set_title("Reward vs KL frontier")
        ax.grid(alpha=0.3)
        if len(points) > 1:
            ax.legend(fontsize=8)
        plots.append(save_figure(fig, out_dir / f"{prefix}ppo_frontier.png"))
    gold = [(k, s, g) for rows, _ in runs if (k := _column(rows, "kl_mean")) and (s := _column(rows, "score_mean"))
            and (g := _column(rows, "gold_score_mean"))]
    if gold:
        plots.append(plot_proxy_and_gold(out_dir / f"{prefix}ppo_gold_vs_proxy.png", gold))
    return plots


def plot_proxy_and_gold(path: Path, runs: list[tuple[list[float], list[float], list[float]]]) -> Path:
    """Proxy and gold RM score of each PPO step against its KL (Gao et al. 2023's over-optimisation plot):
    where the proxy keeps rising and the gold one stops, optimising the proxy no longer helps."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for i, (kl, proxy, gold) in enumerate(runs):
        order = sorted(range(len(kl)), key=lambda j: kl[j])
        suffix = f" (round {i + 1})" if len(runs) > 1 else ""
        ax.plot([kl[j] for j in order], [proxy[j] for j in order], marker=".", label=f"proxy RM (trained against){suffix}")
        ax.plot([kl[j] for j in order], [gold[j] for j in order], marker=".", label=f"gold RM (held out){suffix}")
    ax.set_xlabel("KL to reference (nats / sequence)")
    ax.set_ylabel("mean normalised score")
    ax.set_title("Proxy vs gold reward over the PPO run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bars(path: Path, title: str, groups: list[str], bars: dict[str, list[float | None]],
              errors: dict[str, list[float | None]] | None = None, ylabel: str = "", ylim: tuple | None = None,
              hline: float | None = None) -> Path:
    """Grouped bars: one group per x label (a round), one bar per named series; optional error bars."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    width = 0.8 / max(len(bars), 1)
    for j, (name, values) in enumerate(bars.items()):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values]
        err = [e if e is not None else 0.0 for e in (errors or {}).get(name, [None] * len(values))]
        ax.bar(xs, ys, width, label=name, yerr=err if errors and name in errors else None, capsize=3)
        for x, v in zip(xs, values):
            if v is not None:
                ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                            textcoords="offset points")
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_eval_frontier(path: Path, sft_point: tuple[float, float], policy_points: list[tuple[float, float]],
                       ylabel: str) -> Path:
    """Held-out evaluation: each round's policy at (KL to the SFT model, mean judge score); SFT at KL 0."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    ax.scatter([sft_point[0]], [sft_point[1]], marker="s", color="grey", s=40, label="SFT model", zorder=3)
    xs, ys = [p[0] for p in policy_points], [p[1] for p in policy_points]
    ax.plot([sft_point[0]] + xs, [sft_point[1]] + ys, "-", color="tab:blue", alpha=0.5)
    ax.scatter(xs, ys, color="tab:blue", s=30, label="policy after round n", zorder=3)
    for i, (x, y) in enumerate(policy_points):
        ax.annotate(f"round {i + 1}", (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KL(policy || SFT), nats / response (held-out prompts)")
    ax.set_ylabel(ylabel)
    ax.set_title("Held-out evaluation: judge score vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_frontiers(path: Path, fronts: dict[str, list[dict[str, Any]]], y: str, y_err: str | None,
                   ylabel: str) -> Path:
    """One line per method through its points (KL to the SFT model, `y`), with error bars where given."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0), dpi=100)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    for method, points in fronts.items():
        points = sorted((p for p in points if y in p), key=lambda p: p["kl"])
        if not points:
            continue
        xs, ys = [p["kl"] for p in points], [p[y] for p in points]
        errors = [p[y_err] for p in points] if y_err else None
        ax.errorbar(xs, ys, yerr=errors, marker="o", ms=4, capsize=3, label=method)
    ax.set_xlabel("KL(method || SFT), nats / response (held-out prompts)")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title("Win rate over the SFT model vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rounds_tables(rounds: list[dict[str, Any]]) -> str:
    """One table per stage, figures down and rounds across, so rounds compare at a glance."""
    stages = list(dict.fromkeys(k for r in rounds for k, v in r.items() if isinstance(v, dict)))
    parts = []
    for stage in stages:
        flat = [_flat(r.get(stage) or {}) for r in rounds]
        keys = list(dict.fromkeys(k for f in flat for k in f))
        head = "<th>figure</th>" + "".join(f"<th>round {html.escape(str(r['round']))}</th>" for r in rounds)
        body = "".join("<tr><td>" + html.escape(k) + "</td>" +
                       "".join(f"<td>{html.escape(_fmt(f.get(k, '')))}</td>" for f in flat) + "</tr>" for k in keys)
        parts.append(f"<h3>{html.escape(stage)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} img{max-width:48%;margin:.3em;border:1px solid #eee;vertical-align:top}
.examples td{max-width:340px;white-space:pre-wrap}
"""


def write_report(out_dir: Path, report: dict[str, Any], images: list[Path], examples: list[dict[str, Any]],
                 name: str = "report") -> tuple[Path, Path]:
    """<name>.json with every figure; <name>.html to read them. Images are linked relative to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    atomic_write_json(json_path, report)
    title = "alignloop report" if name == "report" else f"alignloop {name}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head><body>",
             f"<h1>{title}</h1>"]
    plots_html = ""
    if images:
        plots_html = "<h2>Plots</h2>" + "".join(
            f"<img src='{html.escape(str(Path(img).resolve().relative_to(out_dir.resolve())))}' "
            f"alt='{html.escape(Path(img).stem)}'>" for img in images)
    for section, value in report.items():
        if section in ("configs",):
            continue
        if section == "rounds" and plots_html:  # the pictures before the per-round tables they summarise
            parts.append(plots_html)
            plots_html = ""
        parts.append(f"<h2>{html.escape(section)}</h2>")
        if isinstance(value, list) and value and all(isinstance(v, dict) and "round" in v for v in value):
            parts.append(_rounds_tables(value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            parts.append(_table([_flat(v) for v in value]))
        elif isinstance(value, dict):
            parts.append(_table([{"figure": k, "value": v} for k, v in _flat(value).items()]))
        else:
            parts.append(f"<p>{html.escape(_fmt(value))}</p>")
    parts.append(plots_html)
    if examples:
        parts.append("<h2>Examples (held-out prompts)</h2><div class='examples'>" + _table(examples) + "</div>")
    if "configs" in report:
        parts.append("<h2>Configs</h2><details><summary>every stage's config, as run</summary><pre>"
                     + html.escape(json.dumps(report["configs"], indent=2, default=str)) + "</pre></details>")
    parts.append("</body></html>")
    html_path = out_dir / f"{name}.html"
    atomic_write_text(html_path, "\n".join(parts))
    return json_path, html_path


# -- the pipeline's report ----------------------------------------------------------------------------

def _pick(d: dict | None, keys: tuple[str, ...]) -> dict:
    return {k: d[k] for k in keys if d and k in d}


def round_figures(record: dict) -> dict:
    """The figures of one round the report tables show (the stage summaries hold everything)."""
    rm = record.get("reward") or {}
    held = rm.get("held_out_eval") or {}
    ev = dict(record.get("evaluate") or {})
    ev.pop("stage", None)
    return {
        "round": record["round"],
        "sample": _pick(record.get("sample"), ("items", "responses", "dropped_prompts", "eos_rate", "seconds")),
        "annotate": _pick(record.get("annotate"), ("people", "items", "answers", "pairs", "all_rankings", "all_pairs",
                                                   "agreement", "seconds")),
        "reward": {**_pick(rm.get("data"), ("train_items", "held_out_items")),
                   **_pick(rm, ("steps", "final_train_loss", "train_accuracy", "held_out_accuracy", "held_out_loss",
                                "held_out_mean_margin", "normalization", "seconds")),
                   "held_out_ece": (held.get("calibration") or {}).get("ece")},
        "ppo": _pick(record.get("ppo"), ("steps", "episodes", "stopped", "first_score_mean", "final_score_mean",
                                         "first_gold_score_mean", "final_gold_score_mean", "final_kl_mean",
                                         "final_eos_rate", "kl_coef", "episodes_per_second", "seconds")),
        "evaluate": ev,
    }


def rounds_examples(eval_dirs: list[Path], n: int) -> list[dict[str, Any]]:
    """Side by side on the first n held-out prompts: the SFT model, then each round's policy (judge score)."""
    per_round = [read_jsonl(Path(d) / "samples.jsonl")[:n] for d in eval_dirs if (Path(d) / "samples.jsonl").is_file()]
    if not per_round:
        return []
    rows = []
    for i, first in enumerate(per_round[0]):
        row = {"prompt": first["prompt"], "SFT": f"{first['sft']}  [judge {first['sft_judge']:.2f}]"}
        for r, samples in enumerate(per_round):
            if i < len(samples):
                s = samples[i]
                row[f"policy, round {r + 1}"] = f"{s['policy']}  [judge {s['policy_judge']:.2f}, KL {s['kl']:.1f}]"
        rows.append(row)
    return rows


def guards_fired(rounds: list[dict], fatal: list[dict] | None = None) -> list[dict]:
    """Every guard that changed what a run did: PPO's collapse stops and rollbacks, prompts dropped for
    length, and (`fatal`) a stage a non-finite loss or gradient stopped."""
    fired = []
    for record in rounds:
        n, ppo, sample = record["round"], record.get("ppo") or {}, record.get("sample") or {}
        if ppo.get("stopped"):
            fired.append({"round": n, "stage": "ppo", "guard": "collapse stop", "what": ppo["stopped"]})
        if ppo.get("rollbacks"):
            fired.append({"round": n, "stage": "ppo", "guard": "rollback",
                          "what": f"{ppo['rollbacks']} rollback(s) to the last good checkpoint, each at a lower lr"})
        if ppo.get("dropped_prompts_too_long"):
            fired.append({"round": n, "stage": "ppo", "guard": "prompt too long",
                          "what": f"{ppo['dropped_prompts_too_long']} prompt(s) left no room for a response"})
        if sample.get("dropped_prompts"):
            fired.append({"round": n, "stage": "sample", "guard": "prompt too long",
                          "what": f"{sample['dropped_prompts']} prompt(s) dropped"})
    return fired + list(fatal or [])


def pipeline_report(out: Path, summaries: dict, rounds: list[dict], configs: dict, stage_times: list[dict],
                    seconds: float, spec) -> dict:
    """Plots, report.json and report.html for a pipeline run (called after every round, so a stopped run has one)."""
    import os
    import shutil

    out = Path(out)
    plots = out / "plots"
    images: list[Path] = []
    images += plot_ppo_rounds([Path(r["ppo_metrics"]) for r in rounds], plots)
    figures = [round_figures(r) for r in rounds]
    labels = [f"round {r['round']}" for r in rounds]

    rm = [r.get("reward") or {} for r in rounds]
    images.append(plot_bars(plots / "rm_accuracy.png", "Reward model accuracy (pairwise)", labels,
                            {"train": [x.get("train_accuracy") for x in rm],
                             "held-out prompts": [x.get("held_out_accuracy") for x in rm]},
                            ylabel="accuracy", ylim=(0, 1.05), hline=0.5))
    for r, x in zip(rounds, rm):
        png = (x.get("held_out_eval") or {}).get("calibration_png")
        if png and Path(png).is_file():  # the reward eval drew it; the report keeps its own copy
            images.append(Path(shutil.copyfile(png, plots / f"round{r['round']}_rm_calibration.png")))

    ev = [r.get("evaluate") or {} for r in rounds]
    if all("win_rate_policy_over_sft" in e for e in ev) and ev:
        se = [e.get("win_rate_stderr") or {} for e in ev]
        # Every scorer every round has: the judge, the proxy RM, the gold RM, other judges.
        keys = [k for k in ev[0]["win_rate_policy_over_sft"] if all(k in e["win_rate_policy_over_sft"] for e in ev)]
        names = {"by_judge": f"by judge ({ev[0].get('judge', 'judge')})", "by_rm": "by RM", "by_gold": "by gold RM"}
        name = lambda k: names.get(k, k.replace("_", " "))
        images.append(plot_bars(plots / "eval_win_rate.png", "Win rate of policy over SFT (held-out prompts)",
                                labels, {name(k): [e["win_rate_policy_over_sft"][k] for e in ev] for k in keys},
                                errors={name(k): [s.get(k) for s in se] for k in keys},
                                ylabel="win rate (ties half)", ylim=(0, 1.05), hline=0.5))
        images.append(plot_eval_frontier(plots / "eval_frontier.png", (0.0, ev[0]["sft"]["judge_score_mean"]),
                                         [(e["kl_to_reference_mean"], e["policy"]["judge_score_mean"]) for e in ev],
                                         f"mean judge score ({ev[0].get('judge', 'judge')})"))

    last = figures[-1] if figures else {}
    last_eval = last.get("evaluate") or {}
    headline = {
        "rounds": len(rounds),
        "win_rate_policy_over_sft_by_judge": (last_eval.get("win_rate_policy_over_sft") or {}).get("by_judge"),
        "win_rate_policy_over_sft_by_rm": (last_eval.get("win_rate_policy_over_sft") or {}).get("by_rm"),
        "win_rate_by_judge_stderr": (last_eval.get("win_rate_stderr") or {}).get("by_judge"),
        "win_rate_policy_over_sft_by_gold": (last_eval.get("win_rate_policy_over_sft") or {}).get("by_gold"),
        "win_rate_by_gold_stderr": (last_eval.get("win_rate_stderr") or {}).get("by_gold"),
        "kl_to_sft_mean": last_eval.get("kl_to_reference_mean"),
        "judge_score_sft": (last_eval.get("sft") or {}).get("judge_score_mean"),
        "judge_score_policy": (last_eval.get("policy") or {}).get("judge_score_mean"),
        "ppo_target_kl": ((configs.get(f"round{len(rounds)}") or {}).get("ppo") or {}).get("target_kl"),
        "judge": last_eval.get("judge"),
        "held_out_prompts": last_eval.get("prompts"),
    }
    stage_seconds = [e.get("seconds") or 0.0 for e in stage_times]
    report = {
        "headline": headline,
        "run": {"out": str(out), "rounds": spec.rounds, "human_annotators": spec.human, "config_source": spec.source,
                "seconds_this_invocation": round(seconds, 1),
                "seconds_all_stages": round(sum(stage_seconds), 1),
                "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "written": time.strftime("%Y-%m-%d %H:%M:%S")},
        "stage_times": stage_times,
        "base_and_sft": {k: _pick(v, ("documents", "pairs", "steps", "parameters", "held_out_perplexity",
                                      "held_out_response_perplexity", "precision", "seconds"))
                         for k, v in summaries.items()},
        "rounds": figures,
        "guards_fired": guards_fired(rounds, read_json_or_none(out / "guards.json")) or "none",
        "configs": configs,
    }
    write_report(out, report, images, rounds_examples([Path(r["eval_dir"]) for r in rounds], 12))
    return report
