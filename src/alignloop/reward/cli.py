"""`alignloop reward train|eval|score`: thin commands over `alignloop.reward`'s Python API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..commands import ConfigOpt, SetOpt, print_summary, run_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Reward model: train on preferences, evaluate on held-out ones, score responses.")


@app.command()
def train(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
          model: Optional[Path] = typer.Option(None, help="Backbone HF causal LM directory (default runs/demo/sft)."),
          data: Optional[Path] = typer.Option(None, help="Pairs and/or rankings: a .jsonl/.parquet file or a directory."),
          held_out_data: Optional[Path] = typer.Option(None, help="Held-out preferences (default: a split of --data)."),
          out_dir: Optional[Path] = typer.Option(None, help="Where the reward-model directory goes.")):
    """Train a reward model (Bradley–Terry / K-way ranking loss), normalise it, report held-out accuracy."""
    from .train import RewardTrainConfig, train_reward_model

    run_command(RewardTrainConfig, train_reward_model, config, set_, model=model, data=data,
              held_out_data=held_out_data, out_dir=out_dir)


@app.command("eval")
def eval_(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
          reward_model: Optional[Path] = typer.Option(None, help="Reward-model directory."),
          data: Optional[Path] = typer.Option(None, help="Held-out pairs and/or rankings."),
          out_dir: Optional[Path] = typer.Option(None, help="Where the summary and calibration.png go.")):
    """Held-out accuracy, loss, mean margin, calibration (table + PNG) and annotator agreement."""
    from .evaluate import RewardEvalConfig, evaluate_reward_model

    run_command(RewardEvalConfig, evaluate_reward_model, config, set_, reward_model=reward_model, data=data,
              out_dir=out_dir)


@app.command()
def score(reward_model: Path = typer.Option(..., help="Reward-model directory."),
          data: Path = typer.Option(..., help='JSONL of {"prompt", "response"} ("completion" also accepted).'),
          out: Path = typer.Option(..., help='Output JSONL: the input rows plus "reward".'),
          raw: bool = typer.Option(False, help="Raw head output instead of the normalised reward."),
          batch_size: int = 64, device: str = "auto", precision: str = "auto"):
    """Score responses with a reward model (normalised: mean 0, std 1 under the reference policy)."""
    from .score import score_file

    print_summary(score_file(reward_model, data, out, normalize=not raw, batch_size=batch_size,
                             device=device, precision=precision))
