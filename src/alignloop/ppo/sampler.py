"""What samples PPO's rollouts: one small interface, with the built-in KV-cache sampler behind it.

The experience maker asks its sampler for one response per left-padded prompt, each episode drawn
with its own row of uniforms, and tells it after every update that the policy's weights changed.
The old log-probs PPO's ratios start from are always recomputed by the trainer's own forward, never
taken from the sampler; the sampler's own log-probs (when it reports them) only measure how far its
numbers are from the trainer's, logged every step as `sampler_logprob_gap`.

Under FSDP the policy is sharded, and `GatheredPolicySampler` samples from a whole copy of it,
refreshed after every update: the shape an engine takes too.

A generation engine (vLLM, colocated) would be one more class of this shape: `sample` sends the
prompts with per-episode seeds from `rollout.stream_seed(seed, step, episode)` (an engine draws its
own numbers, so its episodes are not the built-in sampler's) and returns the same token layout;
`policy_updated` loads the trainer's weights into the engine. None is shipped: no engine runs on
the machines this was built on (docs/scale.md).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .. import fsdp
from ..mixed_precision import cast_frozen_matmul_weights
from ..modeling import disable_dropout
from ..rollout import TokenBatch, sample_responses
from .config import PPOConfig
from .models import RLModels, unsharded_policy


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


class GatheredPolicySampler:
    """The built-in sampler on a whole copy of a sharded policy, gathered again after each update.

    Decoding calls the model once per token, and a sharded model's call is a collective: every
    process would gather every block at every token, and all would have to decode the same number
    of tokens. So each process samples its episodes from a whole replica instead (the weights only,
    in the matmul dtype: no gradients and no optimiser state, which stay sharded), as a colocated
    engine would. In bf16, FSDP computes with every weight in bf16 and the replica with its matmul
    weights in bf16, so the sampler's log-probs can differ slightly: `sampler_logprob_gap` shows it.
    """

    def __init__(self, models: RLModels, config: PPOConfig):
        self.models, self.config = models, config
        self.replica: torch.nn.Module | None = None
        self.stale = True

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, uniforms: torch.Tensor) -> TokenBatch:
        if self.stale:
            self.gather(prompt_ids.device)
        c, m, tok = self.config, self.models, self.models.tokenizer
        return sample_responses(self.replica, prompt_ids, prompt_mask, c.max_new_tokens, tok.eos_token_id,
                                tok.pad_token_id, c.temperature, c.top_p, precision=m.precision, uniforms=uniforms)

    def gather(self, device: torch.device) -> None:
        """The policy's whole weights into the replica (a collective: every process samples every step)."""
        state = fsdp.full_state_dict(self.models.policy, everywhere=True)
        if self.replica is None:
            replica = unsharded_policy(self.models, state, device)
            self.replica = disable_dropout(replica.requires_grad_(False))
            if self.models.precision == "bf16":
                cast_frozen_matmul_weights(self.replica)
        else:
            self.replica.load_state_dict(state)  # copies into the replica's weights, in their dtype
        self.stale = False

    def policy_updated(self) -> None:
        self.stale = True
