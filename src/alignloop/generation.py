"""Batched sampling from any HF causal LM: the `generate` CLI, `alignloop sample` and evaluation use it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import ConfigError
from .progress import progress
from .modeling import context_length
from .prompts import encode_prompt
from .rollout import finished_rows, left_pad, sample_responses


# The response budget of every stage that generates (sampling for people, PPO, the reward
# model's normalisation, evaluation): the policy is ranked, scored and judged on responses of
# the length it is trained to write.
MAX_NEW_TOKENS = 48


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 32
    seed: int = 0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.greedy and not 0 < self.temperature < math.inf:  # written so that NaN fails it too
            raise ConfigError(f"temperature must be a finite number > 0 (use greedy=true for argmax decoding), "
                              f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Completion:
    prompt: str
    completion: str
    finished: bool  # True when the model emitted EOS within max_new_tokens
    token_ids: list[int]  # the response tokens, EOS included when finished


def check_prompts_fit(prompts: list[str], prompt_ids: list[list[int]], max_new_tokens: int,
                      context: int | None) -> None:
    """Every prompt must leave room for `max_new_tokens` in the model's context."""
    if context is None:
        return
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + max_new_tokens > context]
    if too_long:
        i = too_long[0]
        raise ConfigError(f"{len(too_long)} prompt(s) do not leave room for max_new_tokens={max_new_tokens} in the "
                          f"model's {context}-token context; the first, prompt {i + 1} ({prompts[i][:40]!r}...), is "
                          f"{len(prompt_ids[i])} tokens: shorten them or lower max_new_tokens")


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             settings: SamplingSettings, precision: str = "fp32", show_progress: bool = True,
             compact_fraction: float = 0.25) -> list[Completion]:
    """One completion per prompt, with the same KV-cache sampler that PPO's rollouts use.

    `compact_fraction`: see `rollout.sample_responses` (ended rows leave the batch; 0 keeps them).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    check_prompts_fit(prompts, prompt_ids, settings.max_new_tokens, context_length(model.config))
    # Sorting by prompt length keeps left padding (and wasted compute) small; order restored below.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, Completion] = {}
    eos = tokenizer.eos_token_id
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    for batch in progress(batches, desc="generate", disable=not show_progress):
        ids, mask = left_pad([prompt_ids[i] for i in batch], tokenizer.pad_token_id, device)
        out = sample_responses(model, ids, mask, settings.max_new_tokens, eos, tokenizer.pad_token_id,
                               settings.temperature, settings.top_p, settings.greedy, generator, precision,
                               compact_fraction)
        finished = finished_rows(out, eos).tolist()
        for row, i in enumerate(batch):
            tokens = out.responses[row][out.response_mask[row] == 1].tolist()
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            results[i] = Completion(prompts[i], text, finished[row], tokens)
    return [results[i] for i in range(len(prompts))]
