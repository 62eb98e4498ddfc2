"""Stage 2a: sample K responses per prompt and write a campaign the annotation app serves.

Campaign format (JSONL, one item per line):
    {"item_id": "p0001", "prompt": "...", "responses": ["...", ...], "meta": {sampling settings}}
Identical responses are merged (people cannot rank a response against itself);
a prompt left with fewer than two distinct responses after `max_resample`
extra draws is dropped and counted in the summary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import StageConfig
from .errors import ConfigError, InputError
from .generation import MAX_NEW_TOKENS, SamplingSettings, generate
from .jsonl import write_jsonl
from .modeling import check_model_dir, load_causal_lm, load_tokenizer
from .prompts import read_prompts
from .stage import RoundState, StageContext, log, run_stage, section_number


@dataclass
class SampleConfig(StageConfig):
    model: Path = Path("runs/demo/sft")
    prompts: Path = Path("runs/demo/sft/train_prompts.jsonl")
    out_dir: Path = Path("runs/demo/sample")  # campaign.jsonl goes here
    out: Path | None = None  # deprecated: the campaign file itself (its folder becomes out_dir)
    k: int = 4
    num_prompts: int | None = None  # first N prompts of the file; None: all
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 64
    max_resample: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        if self.out is not None:
            log(f"sample: 'out' is deprecated: use out_dir (the campaign is then out_dir/campaign.jsonl); "
                f"writing {self.out}")
            self.out_dir = Path(self.out).parent
        check_model_dir(self.model)
        if not Path(self.prompts).exists():
            raise InputError(self.prompts, "no such prompts file")
        from .annotate.service import MAX_RESPONSES

        self.require(self.k >= 2, f"k must be >= 2 (people compare at least two responses), got {self.k}")
        self.require(self.k <= MAX_RESPONSES, f"k must be at most {MAX_RESPONSES} (the most responses the "
                                              f"annotation app shows in one item), got {self.k}")
        self.require(self.num_prompts is None or self.num_prompts >= 1, "num_prompts must be >= 1")
        self.require(self.max_resample >= 0, "max_resample must be >= 0")

    def settings(self, seed: int) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_p, self.max_new_tokens, self.batch_size, seed)


def item_id(prompt: str) -> str:
    """Stable across runs and rounds, so answers to the same prompt line up."""
    return "p" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def round_prompts(source: Path, out: Path, round_index: int, per_round: int | None) -> Path:
    """Round n samples prompts [(n-1)·N, n·N) of the training prompts (wrapping), so rounds see new prompts."""
    prompts = read_prompts(source)
    if per_round is None or per_round >= len(prompts):
        chosen = prompts
    else:
        start = ((round_index - 1) * per_round) % len(prompts)
        chosen = (prompts + prompts)[start:start + per_round]
    write_jsonl(out, ({"prompt": p} for p in chosen))
    return out


class SampleStage:
    name = "sample"
    config_class = SampleConfig

    def outputs(self, config: SampleConfig) -> dict[str, Path]:
        return {"campaign": Path(config.out) if config.out is not None else Path(config.out_dir) / "campaign.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """From the latest policy, on this round's slice of the training prompts (`num_prompts` per round)."""
        user = dict(user)
        per_round = section_number("sample", user, "num_prompts", int, None)
        user.pop("num_prompts", None)
        if per_round is not None and per_round < 1:
            raise ConfigError(f"sample.num_prompts (prompts per round) must be >= 1, got {per_round}")
        source = state.prompts("sample", "train_prompts")
        user.pop("prompts", None)
        slice_file = round_prompts(source, state.dir / "prompts.jsonl", state.round, per_round)
        model = state.outputs["ppo"]["model"] if "ppo" in state.outputs else state.policy_dir()
        return {"model": model, "out_dir": state.dir / "sample", **state.response_budget(user), **user,
                "prompts": slice_file, "seed": state.seed(user)}

    def run(self, config: SampleConfig, ctx: StageContext) -> dict[str, Any]:
        return sample_k(config, *ctx.device_and_precision(config))


STAGE = SampleStage()


def sample_campaign(config: SampleConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Sample `k` responses per prompt and write the campaign the annotation app serves."""
    return run_stage(STAGE, config, ctx)


def sample_k(config: SampleConfig, device, precision: str) -> dict[str, Any]:
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model, device, tokenizer)
    prompts = read_prompts(Path(config.prompts), config.num_prompts)

    responses: dict[str, list[str]] = {p: [] for p in prompts}
    finished = total = 0
    for attempt in range(config.max_resample + 1):
        # Ask again only for prompts still short of K distinct responses.
        wanted = [p for p in prompts for _ in range(config.k - len(responses[p]))]
        if not wanted:
            break
        for c in generate(model, tokenizer, wanted, config.settings(config.seed + attempt), precision):
            total += 1
            finished += c.finished
            if c.completion.strip() and c.completion not in responses[c.prompt] and len(responses[c.prompt]) < config.k:
                responses[c.prompt].append(c.completion)

    meta = {"model": str(config.model), "k": config.k, "temperature": config.temperature, "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens, "seed": config.seed}
    items = [{"item_id": item_id(p), "prompt": p, "responses": rs, "meta": meta}
             for p, rs in responses.items() if len(rs) >= 2]
    campaign = STAGE.outputs(config)["campaign"]
    write_jsonl(campaign, items)
    return {
        "out": str(campaign),
        "items": len(items),
        "dropped_prompts": len(prompts) - len(items),
        "responses": sum(len(i["responses"]) for i in items),
        "eos_rate": finished / max(total, 1),
    }
