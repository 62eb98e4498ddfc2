"""Stage 4: PPO against the reward model, with a per-token KL penalty to the SFT model.

One PPO step, top to bottom (`PPOTrainer.step`):
  1. rollout  - sample `batch_size` prompts, generate a response to each with the policy;
  2. score    - (no grad) reference log-probs, critic values, RM score at each response's last token;
  3. reward   - score (normalised by the RM's gain/bias, EOS penalty, optional whitening and clip)
                at the last token, minus beta * KL(policy || reference) at every token;
  4. GAE      - advantages and returns from the per-token rewards and values; whiten advantages;
  5. update   - `ppo_epochs` passes over shuffled mini-batches: clipped policy loss + vf_coef *
                clipped value loss, token-mean over the mini-batch, gradient clipping, one optimiser step;
  6. log, adapt beta, guard against collapse, checkpoint.

Everything numerical (log-probs, ratios, KL, advantages, losses) is fp32; only the
matmuls run in the measured-faster dtype. Dropout is off everywhere (eval mode) so the
log-probs of the update match those of the rollout exactly.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..device import autocast, choose_precision, resolve_device, set_cpu_threads
from ..errors import ConfigError
from ..logprobs import token_logprobs
from ..metrics import MetricsLogger
from ..mixed_precision import MasterWeights, cast_frozen_matmul_weights
from ..modeling import disable_dropout, load_causal_lm, load_scalar_model, load_tokenizer, save_model_dir
from ..progress import progress
from ..prompts import encode_prompt
from ..reward.model import RewardModel
from ..rollout import (
    TokenBatch,
    finished_rows,
    left_pad,
    response_logits,
    sample_responses,
    scalar_head_outputs,
    sequence_scores,
)
from ..sampling import read_prompts
from ..training import clip_grad_norm, make_optimizer
from .config import PPOConfig
from .kl_control import KLController
from .losses import clipped_value_loss, entropy_from_logits, gae, kl_penalty, masked_mean, ppo_policy_loss, \
    token_rewards, whiten


@dataclass
class Rollout:
    """One step's episodes and everything computed about them before the update. Per-token: (B, R)."""

    batch: TokenBatch
    mask: torch.Tensor  # response tokens that take part in the update (response mask, minus masked truncations)
    logprobs: torch.Tensor  # log pi_old(token), at the sampling temperature
    ref_logprobs: torch.Tensor  # log pi_ref(token)
    values: torch.Tensor  # V_old(s_t), the critic before choosing token t
    raw_scores: torch.Tensor  # (B,) RM scores, normalised by the RM's gain and bias
    scores: torch.Tensor  # (B,) after EOS penalty, whitening and clipping: what the policy is paid
    kl: torch.Tensor  # per-token KL estimate
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    finished: torch.Tensor  # (B,) ended with EOS
    # The rollout's own policy and critic forwards, graph kept, when the first update can use them (see rollout).
    live: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (logprobs, logits, values)


class ValueHead(torch.nn.Module):
    """A scalar head on the policy's last hidden state: the cheap critic that shares the policy trunk."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)  # V = 0 at the start; critic warm-up fits it
        torch.nn.init.zeros_(self.score.bias)


class PPOTrainer:
    def __init__(self, config: PPOConfig):
        self.config = c = config
        set_cpu_threads()
        self.device = resolve_device(c.device)
        self.precision = choose_precision(self.device, c.precision)
        self.out_dir = Path(c.out_dir)
        self.generator = torch.Generator(device="cpu").manual_seed(c.seed)  # sampling and shuffling
        torch.manual_seed(c.seed)
        random.seed(c.seed)

        self.tokenizer = tok = load_tokenizer(c.policy)
        self.prompts = read_prompts(Path(c.prompts))
        self.prompt_ids = [encode_prompt(tok, p) for p in self.prompts]
        limit = self._max_prompt_tokens()
        kept = [i for i, ids in enumerate(self.prompt_ids) if len(ids) <= limit]
        self.dropped_prompts = len(self.prompts) - len(kept)
        if not kept:
            raise ConfigError(f"every prompt in {c.prompts} is longer than {limit} tokens "
                              f"(the model's context minus max_new_tokens={c.max_new_tokens})")
        self.prompts = [self.prompts[i] for i in kept]
        self.prompt_ids = [self.prompt_ids[i] for i in kept]

        self._build_models()
        self.optimizer = self._build_optimizer()
        self.trained_params = [p for g in self.optimizer.param_groups for p in g["params"]]  # policy + critic
        total_updates = c.steps * c.ppo_epochs * c.num_mini_batches
        # Linear annealing to 0 (CleanRL): the last updates, on a policy far from the SFT model, are the smallest.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda u: 1.0 - u / total_updates) if c.anneal_lr else (lambda u: 1.0))
        self.kl_ctl = KLController(c.kl_coef, c.target_kl, c.kl_horizon)
        self.step_index = 0  # steps completed
        self.first_eos_rate: float | None = None
        self.rollbacks = 0
        self.timing = {"generation": 0.0, "scoring": 0.0, "update": 0.0}
        self.steady_seconds, self.steady_episodes = 0.0, 0  # steps after the first (warm-up) one

    # ---------------------------------------------------------------------------------------------- setup
    def _max_prompt_tokens(self) -> int:
        config = json.loads((Path(self.config.policy) / "config.json").read_text())
        context = config.get("n_positions") or config.get("max_position_embeddings") or 2048
        return context - self.config.max_new_tokens

    def _build_models(self) -> None:
        c, tok, dev = self.config, self.tokenizer, self.device
        policy = load_causal_lm(c.policy, dev, tok)
        self.reward = RewardModel.from_pretrained(c.reward_model, dev, self.precision)
        if len(self.reward.tokenizer) != len(tok):
            raise ConfigError(f"the reward model ({c.reward_model}) and the policy ({c.policy}) must share a "
                              f"tokenizer: vocabularies of {len(self.reward.tokenizer)} and {len(tok)} tokens")
        if c.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            # The reference is the same weights with the adapters switched off: one copy of the model in memory.
            policy = get_peft_model(policy, LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha,
                                                       lora_dropout=c.lora_dropout, target_modules="all-linear"))
            self.reference = None
        else:
            self.reference = load_causal_lm(c.policy, dev, tok)
            self.reference.requires_grad_(False)
        # Dropout off for good (not just eval mode): update-time log-probs must equal rollout-time ones,
        # and gradient checkpointing only works in train mode.
        self.policy = disable_dropout(policy)

        self.critic: PreTrainedModel | None = None
        self.value_head: ValueHead | None = None
        if c.critic == "separate":
            critic = load_scalar_model(c.value_model or c.reward_model)
            critic.config.pad_token_id = tok.pad_token_id
            self.critic = disable_dropout(critic.to(dev))
        else:
            self.value_head = ValueHead(self.policy.config.hidden_size).to(dev)
        # bf16: the models compute with bf16 matmul weights they hold, the optimiser steps fp32 masters
        # (mixed_precision.py: the same numbers as autocast without its per-forward weight casts and
        # per-backward gradient casts). Not under LoRA, whose frozen base must stay fp32 to be merged.
        bf16_masters = self.precision == "bf16" and c.lora_r == 0
        self.master_weights = MasterWeights([self.policy] + ([self.critic] if self.critic is not None else []),
                                            enabled=bf16_masters)
        if bf16_masters:
            cast_frozen_matmul_weights(self.reference)
        if self.precision == "bf16":
            cast_frozen_matmul_weights(self.reward.model.requires_grad_(False))
        if c.gradient_checkpointing:
            for model in (self.policy, self.critic):
                if model is not None:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if c.lora_r > 0:
                self.policy.enable_input_require_grads()

    def _critic_module(self) -> torch.nn.Module:
        return self.critic if self.critic is not None else self.value_head

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        optimizer = make_optimizer(self.policy, c.lr, c.weight_decay, master_weights=self.master_weights)
        self.policy_params = [p for g in optimizer.param_groups for p in g["params"]]  # masters where bf16
        critic = self._critic_module()
        for group in make_optimizer(critic, c.critic_lr or c.lr, c.weight_decay,
                                    master_weights=self.master_weights).param_groups:
            optimizer.add_param_group(group)
        return optimizer

    # --------------------------------------------------------------------------------------- forwards
    def policy_logprobs(self, batch: TokenBatch, with_hidden: bool = False):
        """log pi(response token) at the sampling temperature: (B, R) fp32; and logits (and the trunk's states)."""
        if with_hidden:  # the value head reads the policy's last hidden state: one forward for both
            R = batch.responses.shape[1]
            P = batch.prompt_width
            with autocast(self.device, self.precision):
                out = self.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, output_hidden_states=True, use_cache=False)
            logits = out.logits[:, P - 1:P - 1 + R]
            hidden = out.hidden_states[-1][:, P - 1:P - 1 + R]
        else:
            logits, hidden = response_logits(self.policy, batch, self.precision), None
        logprobs = token_logprobs(logits, batch.responses, self.config.temperature)
        return logprobs, logits, hidden

    def reference_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        if self.reference is not None:
            logits = response_logits(self.reference, batch, self.precision)
        else:
            with self.policy.disable_adapter():
                logits = response_logits(self.policy, batch, self.precision)
        return token_logprobs(logits, batch.responses, self.config.temperature)

    def critic_values(self, batch: TokenBatch, policy_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """V(s_t) for each response position t: (B, R) fp32."""
        if self.critic is not None:
            return scalar_head_outputs(self.critic, batch, self.precision)[:, :-1]
        return self.value_head.score(policy_hidden.float()).squeeze(-1)

    # ----------------------------------------------------------------------------------------- rollout
    def step_prompts(self, step: int) -> list[int]:
        """Indices of this step's prompts: a seeded shuffle per pass over the prompts; position = step."""
        n, b = len(self.prompts), self.config.batch_size
        chosen = []
        for position in range(step * b, (step + 1) * b):
            epoch, offset = divmod(position, n)
            order = list(range(n))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            chosen.append(order[offset])
        return chosen

    @property
    def reuses_rollout_forward(self) -> bool:
        """With one mini-batch of one micro-batch, the first update sees exactly the rollout's batch and weights.

        So the rollout's policy and critic forwards, run with autograd on, serve as that update's
        forwards too (the old log-probs and values are their detached copies): two forwards of the
        ~28 forward-equivalents of a 4-epoch step saved. Not under gradient checkpointing, whose
        point is to not keep the activations this holds.
        """
        c = self.config
        return c.num_mini_batches == 1 and c.gradient_accumulation_steps == 1 and not c.gradient_checkpointing

    @torch.no_grad()
    def rollout(self, step: int) -> Rollout:
        c, tok = self.config, self.tokenizer
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = left_pad([self.prompt_ids[i] for i in self.step_prompts(step)],
                                           tok.pad_token_id, self.device)
        batch = sample_responses(self.policy, prompt_ids, prompt_mask, c.max_new_tokens, tok.eos_token_id,
                                 tok.pad_token_id, c.temperature, c.top_p, generator=self.generator,
                                 precision=self.precision)
        t1 = time.perf_counter()

        live = None
        with torch.set_grad_enabled(self.reuses_rollout_forward):
            logprobs, logits, hidden = self.policy_logprobs(batch, with_hidden=self.value_head is not None)
            values = self.critic_values(batch, hidden)
        if self.reuses_rollout_forward:
            live = (logprobs, logits, values)
            logprobs, values = logprobs.detach(), values.detach()
        ref_logprobs = self.reference_logprobs(batch)
        raw_scores = self.reward.normalize(
            sequence_scores(scalar_head_outputs(self.reward.model, batch, self.precision), batch))
        finished = finished_rows(batch, tok.eos_token_id)
        t2 = time.perf_counter()
        self.timing["generation"] += t1 - t0
        self.timing["scoring"] += t2 - t1

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
        kl = kl_penalty(logprobs, ref_logprobs, c.kl_estimator) * mask
        rewards = token_rewards(scores, kl, self.kl_ctl.value, mask)
        advantages, returns = gae(rewards, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = whiten(advantages, mask)
        return Rollout(batch, mask, logprobs, ref_logprobs, values, raw_scores, scores, kl, rewards, advantages,
                       returns, finished, live)

    # ------------------------------------------------------------------------------------------ update
    def update(self, ro: Rollout, train_policy: bool) -> dict[str, float]:
        """`ppo_epochs` passes of mini-batch updates over one rollout; returns the averaged statistics."""
        c = self.config
        critic = self._critic_module()
        self.policy.train()  # dropout is off (disable_dropout); train mode lets gradient checkpointing work
        critic.train()
        sums = {"pg_loss": 0.0, "vf_loss": 0.0, "clipped": 0.0, "vf_clipped": 0.0, "approx_kl": 0.0, "tokens": 0.0,
                "entropy": 0.0, "entropy_tokens": 0.0}
        ratio_max = 0.0
        for epoch in range(c.ppo_epochs):
            order = torch.randperm(c.batch_size, generator=self.generator)
            for mb_start in range(0, c.batch_size, c.mini_batch_size):
                mb_rows = order[mb_start:mb_start + c.mini_batch_size]
                # Token-mean over the whole mini-batch, however the micro-batches split it.
                mb_tokens = ro.mask[mb_rows].sum().clamp(min=1.0)
                for mc_start in range(0, c.mini_batch_size, c.micro_batch_size):
                    rows = mb_rows[mc_start:mc_start + c.micro_batch_size]
                    if ro.live is not None:  # the rollout's forwards, for the whole batch in its own order
                        rows = torch.arange(c.batch_size)
                        (logprobs, logits, values), ro.live = ro.live, None
                    else:
                        batch = ro.batch.select(rows)
                        logprobs, logits, hidden = self.policy_logprobs(batch, with_hidden=self.value_head is not None)
                        values = self.critic_values(batch, hidden)
                    mask = ro.mask[rows]
                    pg_sum, pg_stats = ppo_policy_loss(logprobs, ro.logprobs[rows], ro.advantages[rows], mask,
                                                       c.cliprange)
                    vf_sum, vf_clipped = clipped_value_loss(values, ro.values[rows], ro.returns[rows], mask,
                                                            c.cliprange_value)
                    loss = (pg_sum if train_policy else 0.0) + c.vf_coef * vf_sum
                    (loss / mb_tokens).backward()
                    self.master_weights.accumulate_grads()  # bf16: weight grads -> fp32 master grads
                    with torch.no_grad():
                        if epoch == 0:  # entropy of the rollout policy, measured once
                            sums["entropy"] += float((entropy_from_logits(logits) * mask).sum())
                            sums["entropy_tokens"] += float(mask.sum())
                        sums["pg_loss"] += float(pg_sum)
                        sums["vf_loss"] += float(vf_sum)
                        sums["clipped"] += float(pg_stats["clipped_tokens"])
                        sums["vf_clipped"] += float(vf_clipped)
                        sums["approx_kl"] += float(pg_stats["approx_kl_sum"])
                        sums["tokens"] += float(mask.sum())
                        ratio_max = max(ratio_max, float(pg_stats["ratio_max"]))
                grad_norm = clip_grad_norm(self.trained_params, c.max_grad_norm)
                if not train_policy:  # critic warm-up: the policy's (zero) grads must not move it either
                    for p in self.policy_params:
                        p.grad = None
                self.optimizer.step()
                self.master_weights.copy_masters_to_models()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.policy.eval()
        critic.eval()
        n = max(sums["tokens"], 1.0)
        return {"pg_loss": sums["pg_loss"] / n, "vf_loss": sums["vf_loss"] / n, "clipfrac": sums["clipped"] / n,
                "vf_clipfrac": sums["vf_clipped"] / n, "approx_kl": sums["approx_kl"] / n,
                "entropy_mean": sums["entropy"] / max(sums["entropy_tokens"], 1.0), "ratio_max": ratio_max,
                "grad_norm": float(grad_norm)}

    # -------------------------------------------------------------------------------------------- step
    def step(self) -> dict[str, float]:
        c = self.config
        step = self.step_index
        t0 = time.perf_counter()
        ro = self.rollout(step)
        t1 = time.perf_counter()
        stats = self.update(ro, train_policy=step >= c.critic_warmup_steps)
        t2 = time.perf_counter()
        self.timing["update"] += t2 - t1
        if step > 0:  # the first step pays one-off costs (kernel selection, allocator warm-up)
            self.steady_seconds += t2 - t0
            self.steady_episodes += c.batch_size

        kl_per_sequence = (ro.kl * ro.mask).sum(1)  # nats per response
        lengths = ro.batch.response_mask.sum(1)
        metrics = {
            "score_mean": float(ro.raw_scores.mean()),
            "score_std": float(ro.raw_scores.std()) if len(ro.raw_scores) > 1 else 0.0,
            "reward_mean": float(ro.scores.mean()),
            "kl_mean": float(kl_per_sequence.mean()),
            "kl_coef": self.kl_ctl.value,
            "non_score_reward": float(-(self.kl_ctl.value * kl_per_sequence).mean()),
            "response_length_mean": float(lengths.mean()),
            "eos_rate": float(ro.finished.float().mean()),
            "value_mean": float(masked_mean(ro.values, ro.mask)),
            "advantage_raw_std": float(ro.advantages.std()),
            **stats,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds_rollout": t1 - t0,  # generation and the scoring forwards
            "seconds_update": t2 - t1,
        }
        self.kl_ctl.update(metrics["kl_mean"], c.batch_size)
        self.step_index += 1
        self._last_rollout = ro
        return metrics

    def collapse_reason(self, metrics: dict[str, float]) -> str | None:
        """Why this step's policy cannot be kept, or None. Checked after every step."""
        c = self.config
        if any(isinstance(v, float) and not math.isfinite(v) for v in metrics.values()):
            bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
            return f"non-finite values ({', '.join(bad)})"
        if c.target_kl is not None and metrics["kl_mean"] > c.kl_stop_factor * c.target_kl:
            return (f"KL to the reference {metrics['kl_mean']:.2f} nats is past "
                    f"{c.kl_stop_factor * c.target_kl:.2f} (kl_stop_factor x target_kl)")
        if metrics["ratio_max"] > c.ratio_stop:
            return f"policy ratio reached {metrics['ratio_max']:.1f} (> ratio_stop={c.ratio_stop})"
        if (self.first_eos_rate is not None and self.first_eos_rate >= 2 * c.min_eos_rate
                and metrics["eos_rate"] < c.min_eos_rate):
            return (f"EOS rate collapsed to {metrics['eos_rate']:.2f} (from {self.first_eos_rate:.2f}): "
                    f"responses no longer end")
        return None

    # ------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def state_dict(self) -> dict:
        critic = self._critic_module()
        return {
            "step": self.step_index,
            "policy": self._model_state(0, self.policy),
            "critic": self._model_state(1, critic),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "rng": rng_state(self.generator),
            "first_eos_rate": self.first_eos_rate,
            "timing": dict(self.timing),
            "config": self.config.to_dict(),
        }

    def _model_state(self, index: int, model: torch.nn.Module) -> dict:
        """A trained model's weights in fp32: the masters where the model holds bf16 copies."""
        if index < len(self.master_weights.models):  # the policy, and the critic when separate
            return self.master_weights.state_dict(index)
        return model.state_dict()  # the value head

    def _load_model_state(self, index: int, model: torch.nn.Module, state: dict) -> None:
        if index < len(self.master_weights.models):
            self.master_weights.load_state_dict(index, state)
        else:
            model.load_state_dict(state)

    def load_policy_weights(self, state: dict) -> None:
        """Start from other policy weights (e.g. the last round's); the fp32 masters too, where bf16."""
        self._load_model_state(0, self.policy, state)

    def load_state_dict(self, state: dict) -> None:
        self._load_model_state(0, self.policy, state["policy"])
        self._load_model_state(1, self._critic_module(), state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        set_rng_state(state["rng"], self.generator)
        self.step_index = state["step"]
        self.first_eos_rate = state["first_eos_rate"]
        self.timing = dict(state["timing"])

    def restore_last_good(self) -> None:
        """Back to the last checkpoint; the time already spent stays counted."""
        timing = dict(self.timing)
        self.load_state_dict(load_checkpoint(self.checkpoint_dir, self.device))
        self.timing = timing

    def save_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_dir, self.state_dict())

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> dict:
        c = self.config
        start = time.time()
        resumed_from = 0
        state = load_checkpoint(self.checkpoint_dir, self.device) if c.resume else None
        if state is not None:
            self.load_state_dict(state)
            resumed_from = self.step_index
        else:
            self.save_checkpoint()  # step 0 is the first "last good" state to fall back to
        logger = MetricsLogger(self.out_dir, c.tensorboard, resume_step=resumed_from)
        stopped: str | None = None
        bar = progress(total=c.steps, initial=self.step_index, desc="ppo")
        history: list[dict] = []
        while self.step_index < c.steps:
            metrics = self.step()
            if self.first_eos_rate is None:
                self.first_eos_rate = metrics["eos_rate"]
            reason = self.collapse_reason(metrics)
            if reason is not None:
                logger.log(self.step_index, {**metrics, "collapse": reason})
                if c.on_collapse == "rollback" and self.rollbacks < 3:
                    self.rollbacks += 1
                    self.restore_last_good()
                    # Retry more gently, on other samples.
                    for group in self.optimizer.param_groups:
                        group["lr"] *= 0.5
                    self.scheduler.base_lrs = [lr * 0.5 for lr in self.scheduler.base_lrs]
                    self.generator.manual_seed(c.seed + 7919 * self.rollbacks)
                    bar.write(f"ppo: {reason}; rolled back to step {self.step_index} with half the learning rate")
                    continue
                collapsed_at = self.step_index
                self.restore_last_good()
                stopped = f"stopped at step {collapsed_at}: {reason}; kept the policy of step {self.step_index}"
                bar.write(f"ppo: {stopped}")
                break
            history.append(metrics)
            if self.step_index % c.log_every == 0 or self.step_index == c.steps:
                logger.log(self.step_index, metrics)
            if self.step_index % c.sample_every == 0 or self.step_index == 1:
                logger.log_table(self.step_index, "samples", self.sample_rows(self._last_rollout))
            if c.checkpoint_every and self.step_index % c.checkpoint_every == 0:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(score=f"{metrics['score_mean']:.2f}", kl=f"{metrics['kl_mean']:.2f}",
                            eos=f"{metrics['eos_rate']:.2f}")
        bar.close()
        logger.close()
        self.save_checkpoint()
        return self.finish(history, start, resumed_from, stopped)

    def sample_rows(self, ro: Rollout, n: int = 4) -> list[dict]:
        tok = self.tokenizer
        rows = []
        for i in range(min(n, len(ro.raw_scores))):
            prompt = ro.batch.input_ids[i, :ro.batch.prompt_width][ro.batch.attention_mask[i, :ro.batch.prompt_width] == 1]
            response = ro.batch.responses[i][ro.batch.response_mask[i] == 1]
            rows.append({"prompt": tok.decode(prompt, skip_special_tokens=True),
                         "response": tok.decode(response, skip_special_tokens=True),
                         "score": round(float(ro.raw_scores[i]), 3),
                         "kl": round(float((ro.kl[i] * ro.mask[i]).sum()), 3)})
        return rows

    def finish(self, history: list[dict], start: float, resumed_from: int, stopped: str | None) -> dict:
        c = self.config
        policy = self.policy
        if c.lora_r > 0:
            policy.save_pretrained(self.out_dir / "adapter")  # the adapters alone, for peft users
            policy = policy.merge_and_unload()  # a plain HF model: loads with no peft
        # The saved weights are the fp32 masters, not their bf16 roundings.
        with self.master_weights.fp32_models():
            save_model_dir(policy, self.tokenizer, self.out_dir, c.max_new_tokens)
            if self.critic is not None:
                self.critic.save_pretrained(self.out_dir / "critic", safe_serialization=True)
        c.save(self.out_dir)
        tail = history[-max(1, len(history) // 5):] if history else []
        episodes = (self.step_index - resumed_from) * c.batch_size
        summary = {
            "stage": "ppo",
            "out_dir": str(self.out_dir),
            "steps": self.step_index,
            "episodes": self.step_index * c.batch_size,
            "resumed_from_step": resumed_from,
            "stopped": stopped,
            "dropped_prompts_too_long": self.dropped_prompts,
            "first_score_mean": history[0]["score_mean"] if history else None,
            "final_score_mean": statistics.fmean(m["score_mean"] for m in tail) if tail else None,
            "final_kl_mean": statistics.fmean(m["kl_mean"] for m in tail) if tail else None,
            "final_eos_rate": statistics.fmean(m["eos_rate"] for m in tail) if tail else None,
            "kl_coef": self.kl_ctl.value,
            "seconds_generation": self.timing["generation"],
            "seconds_scoring": self.timing["scoring"],
            "seconds_update": self.timing["update"],
            "episodes_per_second": (self.steady_episodes / self.steady_seconds) if self.steady_seconds else
            episodes / max(time.time() - start, 1e-9),
            "warmup_steps_excluded": 1 if self.steady_seconds else 0,
            "precision": self.precision,
            "device": str(self.device),
            "seconds": time.time() - start,
        }
        (self.out_dir / "ppo_summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def ppo(config: PPOConfig) -> dict:
    """Run PPO as configured; writes the policy as a HF directory at `config.out_dir`."""
    return PPOTrainer(config).train()
