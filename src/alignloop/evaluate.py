"""Stage 5: how the policy compares with the SFT model on held-out prompts.

For each prompt, one response from the SFT (reference) model and one from the
policy, sampled with the same settings. Figures: mean RM score of each, the
judge's score of each (a label function, VADER by default, standing in for
people), win rate of policy over SFT by the RM and by the judge (ties count
half), KL(policy || reference) per response, response length, EOS rate, and
the perplexity of the policy's responses under the reference (fluency).

A gold reward model (`gold_reward_model`: any RM directory the policy was never trained
against) scores both sides too: the held-out judge of Gao et al.'s over-optimisation study.
With `best_of_n` > 1 the policy side is the best of N samples of `policy` by the reward model,
a baseline that trains nothing; its KL to the policy it samples is log N - (N - 1) / N
(Stiennon et al. 2020, appendix), reported in place of the measured one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import StageConfig
from .generation import MAX_NEW_TOKENS, Completion, SamplingSettings, generate
from .jsonl import write_jsonl
from .labelers import load_label_function
from .logprobs import response_logprobs
from .modeling import check_model_dir, load_causal_lm, load_tokenizer
from .prompts import encode_prompt, read_prompts
from .reward.model import RewardModel
from .stage import RoundState, StageContext, run_stage

if TYPE_CHECKING:
    import torch


MAX_BEST_OF_N = 1024  # samples per prompt held in memory at once


@dataclass
class EvaluateConfig(StageConfig):
    policy: Path = Path("runs/demo/policy")
    reference: Path = Path("runs/demo/sft")
    reward_model: Path = Path("runs/demo/reward_model")
    gold_reward_model: Path | None = None  # a held-out RM never used for training the policy
    best_of_n: int = 1  # > 1: the policy side is the RM-best of this many samples of `policy`
    prompts: Path = Path("runs/demo/sft/held_out_pairs.jsonl")
    out_dir: Path = Path("runs/demo/eval")
    judge: str = "vader"  # label function: 'vader', 'module:function' or 'file.py:function'
    other_judges: list[str] = field(default_factory=list)  # more label functions, each a win rate of its own
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
        for path in (self.policy, self.reference, self.reward_model, self.gold_reward_model):
            if path is not None:
                check_model_dir(path)
        self.require(self.num_prompts >= 1, "num_prompts must be >= 1")
        self.require(1 <= self.best_of_n <= MAX_BEST_OF_N, f"best_of_n must be in [1, {MAX_BEST_OF_N}]")
        with self.about("judge"):
            load_label_function(self.judge)  # fail now, not after sampling
        with self.about("other_judges"):
            for name in self.other_judges:
                load_label_function(name)
            self.require(len({judge_key(j) for j in [self.judge, *self.other_judges]}) == 1 + len(self.other_judges),
                         "judge and other_judges must be different label functions")


def win_outcomes(a: list[float], b: list[float]) -> list[float]:
    """Per item: 1 where a beats b, 1/2 on a tie, 0 where b wins."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean of `values`: their std over sqrt(n) (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) / len(values) ** 0.5


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of items where a beats b; ties count half."""
    return sum(win_outcomes(a, b)) / len(a)


def win_rate_stderr(a: list[float], b: list[float]) -> float:
    """Standard error of `win_rate(a, b)`: the std of the per-item outcomes (1, 1/2, 0) over sqrt(n).

    A win rate is "above 1/2" only when it is a couple of these away from it.
    """
    return mean_stderr(win_outcomes(a, b))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) in nats: log n - (n - 1) / n, for samples with distinct scores."""
    return math.log(n) - (n - 1) / n


def best_of_n(policy, tokenizer, prompts: list[str], settings: SamplingSettings, precision: str,
              rm: RewardModel, n: int) -> list[Completion]:
    """For each prompt, of `n` samples of `policy`, the one the reward model scores highest (first on a tie)."""
    candidates = generate(policy, tokenizer, [p for p in prompts for _ in range(n)], settings, precision)
    scores = rm.score([c.prompt for c in candidates], [c.completion for c in candidates])
    best = []
    for i in range(len(prompts)):
        group = range(i * n, (i + 1) * n)
        best.append(candidates[max(group, key=lambda j: scores[j])])
    return best


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all n-grams of `texts` (0 when there are none).
    A policy that says the same things to every prompt scores low."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def prompt_relevance(own: list[float], other: list[float], lengths: list[int]) -> dict[str, float]:
    """How much replies depend on the prompt they answer, from each reply's log-likelihood under the
    reference after its own prompt (`own`) and after another prompt of the set (`other`).

    `prompt_relevance`: the share of replies more likely after their own prompt (ties half): near 1
    when each reply answers its prompt, near 1/2 for replies that would do for any prompt (a policy
    that found one text its reward model likes, whatever was asked). `prompt_relevance_nats_per_token`:
    the summed margin over the replies' `lengths` in tokens, an estimate of the pointwise mutual
    information of reply and prompt per token, so that shorter replies are not counted as less relevant.
    """
    return {"prompt_relevance": win_rate(own, other),
            "prompt_relevance_nats_per_token": sum(a - b for a, b in zip(own, other)) / max(sum(lengths), 1)}


def reply_logliks(model, tokenizer, prompt_ids: list[list[int]], completions: list[Completion], precision: str,
                  own: list[torch.Tensor] | None = None) -> tuple[list[float], list[float]]:
    """Each reply's log-likelihood under `model` at T = 1 after its own prompt, and after the next
    prompt in the list (the last after the first): what `prompt_relevance` compares. `own`: the
    replies' per-token log-probs after their own prompt at T = 1, where the caller has them already."""
    replies = [c.token_ids for c in completions]
    if own is None:
        own = response_logprobs(model, prompt_ids, replies, tokenizer.pad_token_id, precision, 1.0)
    other = response_logprobs(model, prompt_ids[1:] + prompt_ids[:1], replies, tokenizer.pad_token_id, precision, 1.0)
    return [float(x.sum()) for x in own], [float(x.sum()) for x in other]


def judge_key(spec: str) -> str:
    """'afinn' -> 'afinn', 'pkg.module:function' or 'file.py:function' -> 'function': a judge's name in the figures."""
    return spec.rsplit(":", 1)[-1]


def _side(completions: list[Completion], rm_scores: list[float], judge_scores: list[float]) -> dict:
    return {
        "rm_score_mean": statistics.fmean(rm_scores),
        "judge_score_mean": statistics.fmean(judge_scores),
        "length_mean": statistics.fmean(len(c.token_ids) for c in completions),
        "eos_rate": sum(c.finished for c in completions) / len(completions),
        "distinct_2": distinct_n([c.completion for c in completions], 2),
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
                **({"gold_reward_model": state.outputs["gold_reward"]["model"]} if "gold_reward" in state.outputs else {}),
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
    rm = RewardModel.from_pretrained(config.reward_model, device, precision)
    ref_out = generate(reference, tokenizer, prompts, settings, precision)
    if config.best_of_n > 1:
        pol_out = best_of_n(policy, tokenizer, prompts, settings, precision, rm, config.best_of_n)
    else:
        pol_out = generate(policy, tokenizer, prompts, settings, precision)

    ref_rm = rm.score(prompts, [c.completion for c in ref_out])
    pol_rm = rm.score(prompts, [c.completion for c in pol_out])
    gold = {}
    if config.gold_reward_model is not None:
        gold_rm = RewardModel.from_pretrained(config.gold_reward_model, device, precision)
        gold = {"sft_gold": gold_rm.score(prompts, [c.completion for c in ref_out]),
                "policy_gold": gold_rm.score(prompts, [c.completion for c in pol_out])}
    ref_judge = [float(s) for s in judge(prompts, [c.completion for c in ref_out])]
    pol_judge = [float(s) for s in judge(prompts, [c.completion for c in pol_out])]
    others = {}
    for spec in config.other_judges:
        score = load_label_function(spec)
        others[judge_key(spec)] = ([float(s) for s in score(prompts, [c.completion for c in pol_out])],
                                   [float(s) for s in score(prompts, [c.completion for c in ref_out])])

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
    # Do the replies still answer their prompts? Read by the reference after their own prompt and another's.
    relevance = ({side: prompt_relevance(*reply_logliks(reference, tokenizer, prompt_ids, out, precision, own),
                                         [len(c.token_ids) for c in out])
                  for side, out, own in (("sft", ref_out, None), ("policy", pol_out, lp_ref_t1))}
                 if len(prompts) > 1 else {})

    write_jsonl(STAGE.outputs(config)["samples"], (
        {"prompt": p, "sft": r.completion, "policy": q.completion, "sft_rm": a, "policy_rm": b,
         "sft_judge": c, "policy_judge": d, "kl": k, **{key: values[i] for key, values in gold.items()},
         **{f"{side}_{name}": pair[j][i] for name, pair in others.items() for j, side in enumerate(("policy", "sft"))}}
        for i, (p, r, q, a, b, c, d, k) in enumerate(zip(prompts, ref_out, pol_out, ref_rm, pol_rm, ref_judge,
                                                         pol_judge, kl))))
    by = {"by_rm": (pol_rm, ref_rm), "by_judge": (pol_judge, ref_judge)}
    if gold:
        by["by_gold"] = (gold["policy_gold"], gold["sft_gold"])
    by.update({f"by_{name}": pair for name, pair in others.items()})
    sft_side, policy_side = _side(ref_out, ref_rm, ref_judge), _side(pol_out, pol_rm, pol_judge)
    if gold:
        sft_side["gold_score_mean"] = statistics.fmean(gold["sft_gold"])
        policy_side["gold_score_mean"] = statistics.fmean(gold["policy_gold"])
    if relevance:
        sft_side.update(relevance["sft"])
        policy_side.update(relevance["policy"])
    return {
        "prompts": len(prompts),
        "sft": sft_side,
        "policy": policy_side,
        "win_rate_policy_over_sft": {name: win_rate(a, b) for name, (a, b) in by.items()},
        "win_rate_stderr": {name: win_rate_stderr(a, b) for name, (a, b) in by.items()},
        # best-of-n b of policy pi: KL(b || ref) = E_b[log pi/ref] (measured on b's samples) + KL(b || pi)
        "kl_to_reference_mean": statistics.fmean(kl) + (best_of_n_kl(config.best_of_n) if config.best_of_n > 1
                                                        else 0.0),
        "best_of_n": config.best_of_n,
        "policy_perplexity_under_reference": ppl_ref,
        "judge": config.judge,
        "gold_reward_model": str(config.gold_reward_model) if config.gold_reward_model else None,
    }
