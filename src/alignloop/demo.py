"""`alignloop demo`: the whole loop on the embedded default, with no downloads.

pretrain (Debian's fortunes) -> SFT -> rounds of: sample K per prompt -> simulated people
rank them (VADER, with noise) or real people in the annotation app (`--human`) -> reward
model on every ranking so far -> PPO from the last policy (KL to the SFT model) -> evaluation
on held-out prompts; then `out/report.html`. The demo is one pipeline config: the sizes
below keep it within minutes on 2 CPU cores (docs/demo.md has the measured times).
Every stage reuses its output when it exists, so a rerun resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from .pipeline import PipelineSpec, apply_sets, check_sections, run_pipeline

# One section per stage; keys are fields of that stage's config (defaults elsewhere).
DEMO_SECTIONS: dict[str, dict] = {
    "pretrain": {},  # 4 x 256 GPT-2 on fortunes, 3 epochs
    "sft": {},  # 1 epoch of quotation continuations
    # Per round: 2048 new training prompts x 4 responses, ranked (about 9,850 comparisons): with
    # half as many the reward model was too weak for PPO to gain much (docs/demo.md has the runs).
    "sample": {"k": 4, "num_prompts": 2048},
    "annotate": {"label_function": "vader", "annotators": 3, "overlap": 1, "noise": 0.1, "mode": "rank"},
    "reward": {"epochs": 2.0, "held_out_fraction": 0.1},
    # PPOConfig's defaults: 30 steps x 32 episodes, lr 1e-4, beta 0.05 held until the KL reaches
    # 6 nats, then adaptive (docs/demo.md: what other betas did). kl_horizon 32 lets beta move up
    # to 20 % a step: with the default's 5 % the KL overshot the target by half in a 30-step run.
    "ppo": {"kl_horizon": 32},
    "evaluate": {"num_prompts": 200, "judge": "vader"},
}


def demo(out: Path = Path("runs/demo"), rounds: int = 1, human: bool = False, sets: list[str] | None = None) -> dict:
    """Run (or resume) the demo under `out`; `sets` are `section.key=value` overrides of DEMO_SECTIONS."""
    sections = apply_sets(DEMO_SECTIONS, sets)
    check_sections(sections, "alignloop demo")
    return run_pipeline(PipelineSpec(sections, Path(out), rounds, human, source="alignloop demo"))
