"""Stage 5: how the policy compares with the SFT model on held-out prompts.

For each prompt, one response from the SFT (reference) model and one from the
policy, sampled with the same settings. Figures: mean RM score of each, the
judge's score of each (a label function, VADER by default, standing in for
people), win rate of policy over SFT by the RM and by the judge (ties count
half), KL(policy || reference) per response, response length, EOS rate, and
the perplexity of the policy's responses under the reference (fluency).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import StageConfig
from .generation import MAX_NEW_TOKENS, Completion, SamplingSettings, generate
from .jsonl import write_jsonl
from .labelers import load_label_function
from .logprobs import response_logprobs
from .modeling import check_model_dir, load_causal_lm, load_tokenizer
from .prompts import encode_prompt, read_prompts
from .reward.model import RewardModel
from .stage import RoundState, StageContext, run_stage


@dataclass
class EvaluateConfig(StageConfig):
    policy: Path = Path("runs/demo/policy")
    reference: Path = Path("runs/demo/sft")
    reward_model: Path = Path("runs/demo/reward_model")
    prompts: Path = Path("runs/demo/sft/held_out_pairs.jsonl")
    out_dir: Path = Path("runs/demo/eval")
    judge: str = "vader"  # label function: 'vader', 'module:function' or 'file.py:function'
    num_prompts: int = 200
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 64
    seed: int = 1234
    num_examples: int = 12
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        for path in (self.policy, self.reference, self.reward_model):
            check_model_dir(path)
        self.require(self.num_prompts >= 1, "num_prompts must be >= 1")
        with self.about("judge"):
            load_label_function(self.judge)  # fail now, not after sampling


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of items where a beats b; ties count half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def win_rate_stderr(a: list[float], b: list[float]) -> float:
    """Standard error of `win_rate(a, b)`: the std of the per-item outcomes (1, 1/2, 0) over sqrt(n).

    A win rate is "above 1/2" only when it is a couple of these away from it.
    """
    outcomes = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    if len(outcomes) < 2:
        return 0.0
    return statistics.stdev(outcomes) / len(outcomes) ** 0.5


def _side(completions: list[Completion], rm_scores: list[float], judge_scores: list[float]) -> dict:
    return {
        "rm_score_mean": statistics.fmean(rm_scores),
        "judge_score_mean": statistics.fmean(judge_scores),
        "length_mean": statistics.fmean(len(c.token_ids) for c in completions),
        "eos_rate": sum(c.finished for c in completions) / len(completions),
    }


class EvaluateStage:
    name = "evaluate"
    config_class = EvaluateConfig

    def outputs(self, config: EvaluateConfig) -> dict[str, Path]:
        return {"samples": Path(config.out_dir) / "samples.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """This round's policy against the supervised policy, on held-out prompts."""
        return {"policy": state.outputs["ppo"]["model"], "reference": state.policy_dir(),
                "reward_model": state.outputs["reward"]["model"],
                "prompts": state.prompts("evaluate", "held_out_prompts"), "out_dir": state.dir / "eval",
                **state.response_budget(user), **user}

    def run(self, config: EvaluateConfig, ctx: StageContext) -> dict[str, Any]:
        return compare_with_reference(config, *ctx.device_and_precision(config))


STAGE = EvaluateStage()


def evaluate(config: EvaluateConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Policy vs reference on held-out prompts; writes `samples.jsonl` and the summary to `out_dir`."""
    return run_stage(STAGE, config, ctx)


def compare_with_reference(config: EvaluateConfig, device, precision: str) -> dict[str, Any]:
    prompts = read_prompts(Path(config.prompts), config.num_prompts)
    judge = load_label_function(config.judge)
    settings = SamplingSettings(config.temperature, config.top_p, config.max_new_tokens, config.batch_size, config.seed)

    tokenizer = load_tokenizer(config.reference)
    reference = load_causal_lm(config.reference, device, tokenizer)
    policy = load_causal_lm(config.policy, device, tokenizer)
    ref_out = generate(reference, tokenizer, prompts, settings, precision)
    pol_out = generate(policy, tokenizer, prompts, settings, precision)

    rm = RewardModel.from_pretrained(config.reward_model, device, precision)
    ref_rm = rm.score(prompts, [c.completion for c in ref_out])
    pol_rm = rm.score(prompts, [c.completion for c in pol_out])
    ref_judge = [float(s) for s in judge(prompts, [c.completion for c in ref_out])]
    pol_judge = [float(s) for s in judge(prompts, [c.completion for c in pol_out])]

    # KL(policy || reference) on the policy's own samples: sum over tokens of log pi - log pi_ref (k1, unbiased).
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    response_ids = [c.token_ids for c in pol_out]
    lp_pol = response_logprobs(policy, prompt_ids, response_ids, tokenizer.pad_token_id, precision, config.temperature)
    lp_ref = response_logprobs(reference, prompt_ids, response_ids, tokenizer.pad_token_id, precision, config.temperature)
    kl = [float((p - r).sum()) for p, r in zip(lp_pol, lp_ref)]
    # Fluency: perplexity of the policy's text under the reference at T=1.
    lp_ref_t1 = lp_ref if config.temperature == 1.0 else response_logprobs(
        reference, prompt_ids, response_ids, tokenizer.pad_token_id, precision, 1.0)
    n_tokens = sum(len(r) for r in lp_ref_t1)
    ppl_ref = float(math.e ** (-sum(float(r.sum()) for r in lp_ref_t1) / max(n_tokens, 1)))

    write_jsonl(STAGE.outputs(config)["samples"], (
        {"prompt": p, "sft": r.completion, "policy": q.completion, "sft_rm": a, "policy_rm": b,
         "sft_judge": c, "policy_judge": d, "kl": k}
        for p, r, q, a, b, c, d, k in zip(prompts, ref_out, pol_out, ref_rm, pol_rm, ref_judge, pol_judge, kl)))
    return {
        "prompts": len(prompts),
        "sft": _side(ref_out, ref_rm, ref_judge),
        "policy": _side(pol_out, pol_rm, pol_judge),
        "win_rate_policy_over_sft": {"by_rm": win_rate(pol_rm, ref_rm), "by_judge": win_rate(pol_judge, ref_judge)},
        "win_rate_stderr": {"by_rm": win_rate_stderr(pol_rm, ref_rm),
                            "by_judge": win_rate_stderr(pol_judge, ref_judge)},
        "kl_to_reference_mean": statistics.fmean(kl),
        "policy_perplexity_under_reference": ppl_ref,
        "judge": config.judge,
    }
