"""The run report: `report.json` (every figure, per round, with the configs) and `report.html`.

The HTML is one self-contained page: tables of figures, the PNG plots beside
it, and side-by-side example completions. All text from models and prompts is
escaped (a completion may contain anything).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from .jsonl import read_jsonl  # noqa: E402


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ppo_metrics(metrics_file: Path, out_dir: Path, prefix: str = "") -> list[Path]:
    """Reward, KL, entropy and length over PPO steps, and the reward-vs-KL frontier."""
    rows = read_jsonl(metrics_file)
    if not rows:
        return []
    steps = [r.get("step", i) for i, r in enumerate(rows)]

    def col(*names: str) -> list[float] | None:
        for name in names:
            if all(name in r for r in rows):
                return [float(r[name]) for r in rows]
        return None

    plots = []
    for title, names, fname in [
        ("Mean RM score", ("score_mean", "objective/scores"), "ppo_score.png"),
        ("KL(policy || reference) per sequence", ("kl_mean", "objective/kl"), "ppo_kl.png"),
        ("Entropy per token", ("entropy_mean", "objective/entropy"), "ppo_entropy.png"),
        ("Response length (tokens)", ("response_length_mean", "response_length"), "ppo_length.png"),
    ]:
        y = col(*names)
        if y is not None:
            plots.append(plot_series(out_dir / f"{prefix}{fname}", title, {title: (steps, y)}, "PPO step"))
    kl, score = col("kl_mean", "objective/kl"), col("score_mean", "objective/scores")
    if kl is not None and score is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
        sc = ax.scatter(kl, score, c=steps, cmap="viridis", s=14)
        fig.colorbar(sc, ax=ax, label="PPO step")
        ax.set_xlabel("KL to reference (nats / sequence)")
        ax.set_ylabel("mean RM score")
        ax.set_title("Reward vs KL frontier")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / f"{prefix}ppo_frontier.png")
        plt.close(fig)
        plots.append(out_dir / f"{prefix}ppo_frontier.png")
    return plots


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


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} img{max-width:48%;margin:.3em;border:1px solid #eee}
.examples td{max-width:340px;white-space:pre-wrap}
"""


def write_report(out_dir: Path, report: dict[str, Any], images: list[Path], examples: list[dict[str, Any]]) -> tuple[Path, Path]:
    """report.json with every figure; report.html to read them. Images are linked relative to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>alignloop report</title><style>{STYLE}</style></head><body>",
             "<h1>alignloop report</h1>"]
    for section, value in report.items():
        if section in ("configs",):
            continue
        parts.append(f"<h2>{html.escape(section)}</h2>")
        if isinstance(value, list) and value and isinstance(value[0], dict):
            parts.append(_table([_flat(v) for v in value]))
        elif isinstance(value, dict):
            parts.append(_table([{"figure": k, "value": v} for k, v in _flat(value).items()]))
        else:
            parts.append(f"<p>{html.escape(_fmt(value))}</p>")
    if images:
        parts.append("<h2>Plots</h2>")
        for img in images:
            rel = Path(img).resolve().relative_to(out_dir.resolve())
            parts.append(f"<img src='{html.escape(str(rel))}' alt='{html.escape(Path(img).stem)}'>")
    if examples:
        parts.append("<h2>Examples (held-out prompts)</h2><div class='examples'>" + _table(examples) + "</div>")
    if "configs" in report:
        parts.append("<h2>Configs</h2><pre>" + html.escape(json.dumps(report["configs"], indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    return json_path, html_path
