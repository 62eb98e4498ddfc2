"""The experience maker: prompts -> rollout -> scores -> rewards -> advantages, as one `Experience`.

Everything an update needs is computed here, with no gradient (except, see `make`, the
policy and critic forwards the first update can reuse):
  1. rollout  - this step's prompts, `samples_per_prompt` responses each, sampled from the policy;
  2. score    - old log-probs and values, reference log-probs, RM score at each response's last token;
  3. reward   - score (EOS penalty, optional whitening and clip) at the last token, minus
                beta * KL(policy || reference) at every token;
  4. advantages - the `algorithm`'s estimator (ppo.algorithms) over the per-token rewards.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
import torch

from ..distributed import SINGLE_PROCESS, Distributed
from ..rollout import TokenBatch, episode_uniforms, finished_rows, left_pad, make_batch
from .config import PPOConfig
from .kl_control import KLController
from .algorithms import ALGORITHMS
from .losses import kl_penalty, token_rewards, whiten
from .models import RLModels
from .sampler import KVCacheSampler, RolloutSampler

# Shuffles of the prompt order: pass `epoch` over the prompts uses Random(seed * PROMPT_ORDER_STRIDE + epoch).
# A prime stride keeps (seed, epoch) pairs from colliding for any seed and any run length in practice.
PROMPT_ORDER_STRIDE = 1_000_003


@dataclass
class Experience:
    """One step's episodes and everything computed about them before the update. Per-token: (B, R)."""

    batch: TokenBatch
    mask: torch.Tensor  # response tokens that take part in the update (response mask, minus masked truncations)
    logprobs: torch.Tensor  # log pi_old(token), at the sampling temperature
    ref_logprobs: torch.Tensor | None  # log pi_ref(token); None with no KL term (the reference is not run)
    values: torch.Tensor  # V_old(s_t), the critic before choosing token t (0 without a critic)
    raw_scores: torch.Tensor  # (B,) RM scores, normalised by the RM's gain and bias
    scores: torch.Tensor  # (B,) after EOS penalty, whitening and clipping: what the policy is paid
    kl: torch.Tensor  # per-token KL estimate, 0 outside `mask`
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    finished: torch.Tensor  # (B,) ended with EOS
    # The rollout's own policy and critic forwards, graph kept, when the first update can use them (see make).
    live: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (logprobs, logits, values)
    live_rows: torch.Tensor | None = None  # the episodes `live` is of: this process's shard
    gold_scores: torch.Tensor | None = None  # (B,) the gold RM's normalised scores, when there is one: logged only

    @property
    def size(self) -> int:
        return self.batch.responses.shape[0]


class ExperienceMaker:
    def __init__(self, models: RLModels, config: PPOConfig, prompt_ids: list[list[int]], kl_ctl: KLController,
                 dist: Distributed = SINGLE_PROCESS, sampler: RolloutSampler | None = None):
        self.models, self.config, self.prompt_ids = models, config, prompt_ids
        self.kl_ctl = kl_ctl
        self.dist = dist
        self.sampler = sampler or KVCacheSampler(models, config)
        self.estimate_advantages = ALGORITHMS[config.algorithm].estimate_advantages
        self.seconds = {"generation": 0.0, "scoring": 0.0}

    def step_prompts(self, step: int) -> list[int]:
        """Indices of this step's prompts: a seeded shuffle per pass over the prompts; position = step.

        Each prompt appears `samples_per_prompt` times in a row, so a group's responses sit together.
        """
        n, per_step = len(self.prompt_ids), self.config.prompts_per_step
        chosen = []
        for position in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(position, n)
            order = list(range(n))
            random.Random(self.config.seed * PROMPT_ORDER_STRIDE + epoch).shuffle(order)
            chosen += [order[offset]] * self.config.samples_per_prompt
        return chosen

    @property
    def keeps_rollout_graph(self) -> bool:
        """With one mini-batch of one micro-batch, the first update sees exactly the rollout's batch and weights.

        So the rollout's policy and critic forwards, run with autograd on, serve as that update's
        forwards too (the old log-probs and values are their detached copies): two forwards of the
        ~28 forward-equivalents of a 4-epoch step saved. Not under gradient checkpointing, whose
        point is to not keep the activations this holds.
        """
        c = self.config
        return c.num_mini_batches == 1 and c.gradient_accumulation_steps == 1 and not c.gradient_checkpointing

    @torch.no_grad()
    def make(self, step: int, sampling_seed: int) -> Experience:
        """The step's experience, the whole global batch of it, in every process.

        Under several processes each samples and scores its shard of the episodes; the shards are
        gathered before rewards and advantages, so whitening, group baselines and every statistic
        are over the global batch, computed alike in every process. Episode i's tokens are drawn
        with uniforms that depend on (sampling_seed, step, i) alone and its prompt is padded to
        the global batch's width, so it is sampled as one process would sample it.
        """
        c, m, tok, dist = self.config, self.models, self.models.tokenizer, self.dist
        t0 = time.perf_counter()
        device = next(m.policy.parameters()).device
        prompts = [self.prompt_ids[i] for i in self.step_prompts(step)]
        mine = dist.shard(len(prompts))
        width = max(len(p) for p in prompts)
        prompt_ids, prompt_mask = left_pad(prompts[mine.start:mine.stop], tok.pad_token_id, device, width)
        uniforms = episode_uniforms(sampling_seed, step, len(prompts), c.max_new_tokens)[mine.start:mine.stop]
        sampled = self.sampler.sample(prompt_ids, prompt_mask, uniforms)
        batch = self.gathered(sampled, prompts, width)
        local = batch.select(list(mine)) if dist.world_size > 1 else batch
        t1 = time.perf_counter()
        live = None
        with torch.set_grad_enabled(self.keeps_rollout_graph):
            logprobs, logits, values = m.policy_and_values(local)
        if self.keeps_rollout_graph:
            live = (logprobs, logits, values)
            logprobs, values = logprobs.detach(), values.detach()
        ref_logprobs = m.reference_logprobs(local)
        raw_scores = m.reward_scores(local)
        self.seconds["generation"] += t1 - t0
        self.seconds["scoring"] += time.perf_counter() - t1
        gold_scores = None
        if m.gold is not None:  # timed apart: judging the run is not part of its cost
            t2 = time.perf_counter()
            gold_scores = dist.gather_rows(m.reward_scores(local, gold=True))
            self.seconds["gold_scoring"] = self.seconds.get("gold_scoring", 0.0) + time.perf_counter() - t2
        logprobs, values, raw_scores = (dist.gather_rows(t) for t in (logprobs, values, raw_scores))
        ref_logprobs = dist.gather_rows(ref_logprobs) if ref_logprobs is not None else None
        finished = finished_rows(batch, tok.eos_token_id)

        mask, scores = self.paid_scores(batch, raw_scores, finished)
        kl = (kl_penalty(logprobs, ref_logprobs, c.kl_estimator) * mask if ref_logprobs is not None
              else torch.zeros_like(logprobs))
        rewards = token_rewards(scores, kl, self.kl_ctl.value, mask)
        advantages, returns = self.estimate_advantages(rewards, values, mask, c)
        return Experience(batch, mask, logprobs, ref_logprobs, values, raw_scores, scores, kl, rewards, advantages,
                          returns, finished, live, torch.arange(mine.start, mine.stop), gold_scores)

    def gathered(self, sampled: TokenBatch, prompts: list[list[int]], width: int) -> TokenBatch:
        """The global batch of episodes from every process's sampled shard (this one's alone in one process)."""
        dist = self.dist
        if dist.world_size == 1:
            return sampled
        pad, device = self.models.tokenizer.pad_token_id, sampled.input_ids.device
        extra = int(dist.all_reduce_max(sampled.responses.shape[1])) - sampled.responses.shape[1]

        def gather(per_token: torch.Tensor, value: float = 0) -> torch.Tensor:  # every process's rows, width R
            return dist.gather_rows(torch.nn.functional.pad(per_token, (0, extra), value=value))

        prompt_ids, prompt_mask = left_pad(prompts, pad, device, width)
        batch = make_batch(prompt_ids, prompt_mask, gather(sampled.responses, pad), gather(sampled.response_mask))
        if sampled.sampled_logprobs is not None:
            batch.sampled_logprobs = gather(sampled.sampled_logprobs)
        return batch

    def paid_scores(self, batch: TokenBatch, raw_scores: torch.Tensor,
                    finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(update mask, the score each response is paid) after the EOS rules, whitening and clipping."""
        c = self.config
        mask = batch.response_mask.clone()
        scores = raw_scores.clone()
        if c.missing_eos_penalty:
            # A response cut off at max_new_tokens is worse than one that ends: say so in its reward.
            scores = torch.where(finished, scores, scores - c.missing_eos_penalty)
        if c.mask_truncated:
            mask = mask * finished[:, None].float()  # truncated responses teach nothing
        if c.whiten_rewards:
            scores = whiten(scores[:, None], torch.ones_like(scores[:, None]), shift_mean=False)[:, 0]
        if c.reward_clip:
            scores = scores.clamp(-c.reward_clip, c.reward_clip)
        return mask, scores
