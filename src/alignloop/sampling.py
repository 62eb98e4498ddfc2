"""Stage 2a: sample K responses per prompt and write a campaign the annotation app serves.

Campaign format (JSONL, one item per line):
    {"item_id": "p0001", "prompt": "...", "responses": ["...", ...], "meta": {sampling settings}}
Identical responses are merged (people cannot rank a response against itself);
a prompt left with fewer than two distinct responses after `max_resample`
extra draws is dropped and counted in the summary.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import StageConfig
from .device import choose_precision, resolve_device, set_cpu_threads
from .errors import InputError
from .generation import SamplingSettings, generate
from .jsonl import read_records, write_jsonl
from .modeling import check_model_dir, load_causal_lm, load_tokenizer


@dataclass
class SampleConfig(StageConfig):
    model: Path = Path("runs/demo/sft")
    prompts: Path = Path("runs/demo/sft/train_prompts.jsonl")
    out: Path = Path("runs/demo/campaign.jsonl")
    k: int = 4
    num_prompts: int | None = None  # first N prompts of the file; None: all
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64
    max_resample: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        check_model_dir(self.model)
        if not Path(self.prompts).exists():
            raise InputError(self.prompts, "no such prompts file")
        self.require(self.k >= 2, f"k must be >= 2 (people compare at least two responses), got {self.k}")
        self.require(self.num_prompts is None or self.num_prompts >= 1, "num_prompts must be >= 1")
        self.require(self.max_resample >= 0, "max_resample must be >= 0")

    def settings(self, seed: int) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_p, self.max_new_tokens, self.batch_size, seed)


def item_id(prompt: str) -> str:
    """Stable across runs and rounds, so answers to the same prompt line up."""
    return "p" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    rows = read_records(path, required={"prompt": str})
    prompts = list(dict.fromkeys(r["prompt"] for r in rows if r["prompt"].strip()))
    if not prompts:
        raise InputError(path, "no non-empty prompts")
    return prompts[:limit] if limit else prompts


def sample_campaign(config: SampleConfig) -> dict:
    start = time.time()
    set_cpu_threads()
    device = resolve_device(config.device)
    precision = choose_precision(device, config.precision)
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
    write_jsonl(config.out, items)
    summary = {
        "stage": "sample",
        "out": str(config.out),
        "items": len(items),
        "dropped_prompts": len(prompts) - len(items),
        "responses": sum(len(i["responses"]) for i in items),
        "eos_rate": finished / max(total, 1),
        "seconds": time.time() - start,
    }
    Path(str(config.out) + ".summary.json").write_text(json.dumps(summary, indent=2))
    return summary
