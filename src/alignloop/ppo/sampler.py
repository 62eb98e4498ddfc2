"""What samples PPO's rollouts: one small interface, with the built-in KV-cache sampler behind it.

The experience maker asks its sampler for one response per left-padded prompt, each episode drawn
with its own row of uniforms, and tells it after every update that the policy's weights changed.
The old log-probs PPO's ratios start from are always recomputed by the trainer's own forward, never
taken from the sampler; the sampler's own log-probs (when it reports them) only measure how far its
numbers are from the trainer's, logged every step as `sampler_logprob_gap`.

A generation engine (vLLM, colocated) would be one more class of this shape: `sample` sends the
prompts with per-episode seeds from `rollout.stream_seed(seed, step, episode)` (an engine draws its
own numbers, so its episodes are not the built-in sampler's) and returns the same token layout;
`policy_updated` loads the trainer's weights into the engine. None is shipped: no engine runs on
the machines this was built on (docs/scale.md).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..rollout import TokenBatch, sample_responses
from .config import PPOConfig
from .models import RLModels


class RolloutSampler(Protocol):
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, uniforms: torch.Tensor) -> TokenBatch:
        """One response per prompt ((B, P) left-padded), token t of row i drawn with uniforms[i, t]."""
        ...

    def policy_updated(self) -> None:
        """The trainer's policy weights changed (after every update)."""
        ...


class KVCacheSampler:
    """The built-in sampler (`rollout.sample_responses`) on the trainer's own policy module: nothing to sync."""

    def __init__(self, models: RLModels, config: PPOConfig):
        self.models, self.config = models, config

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, uniforms: torch.Tensor) -> TokenBatch:
        c, m, tok = self.config, self.models, self.models.tokenizer
        return sample_responses(m.policy, prompt_ids, prompt_mask, c.max_new_tokens, tok.eos_token_id,
                                tok.pad_token_id, c.temperature, c.top_p, precision=m.precision, uniforms=uniforms)

    def policy_updated(self) -> None:
        pass  # it samples from the very module the optimiser steps
