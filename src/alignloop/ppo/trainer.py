"""Stage 4: PPO against the reward model, with a per-token KL penalty to the SFT model.

The same loop runs the critic-free methods (GRPO, RLOO, REINFORCE++): `algorithm` picks the
advantage estimator (algorithms.py) and whether a critic is learnt at all.

The three parts, as OpenRLHF separates them:
  experience.py  prompts -> rollout -> scores, reference log-probs, values, rewards, advantages
                 (algorithms.py: the estimator per method);
  update.py      `ppo_epochs` passes of clipped policy + value losses over that experience;
  trainer.py     (this file) the loop: step, log, adapt beta, guard against collapse, checkpoint.

Everything numerical (log-probs, ratios, KL, advantages, losses) is fp32; only the
matmuls run in the measured-faster dtype. Dropout is off everywhere (eval mode) so the
log-probs of the update match those of the rollout exactly.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .. import fsdp
from ..errors import ConfigError, InputError
from ..files import atomic_directory
from ..modeling import load_tokenizer, model_context_length, save_model_dir
from ..prompts import encode_prompt, read_prompts
from ..stage import RoundState, StageContext, run_stage, stage_checkpointer
from ..training import make_optimizer, scale_learning_rate
from .config import PPOConfig
from .experience import Experience, ExperienceMaker
from .kl_control import KLController
from .losses import masked_mean
from .models import (build_models, is_lora, load_initial_policy, load_sharded_trained_states, load_trained_state,
                     restore_fp32_base, shard_models, sharded_trained_states, trained_state,
                     unsharded_policy)
from .sampler import GatheredPolicySampler
from .update import PPOUpdate

# After rollback n the sampler is reseeded with seed + ROLLBACK_SEED_STRIDE * n, so the retry sees
# other samples than the ones that collapsed; a prime keeps these streams apart from the rounds' seeds.
ROLLBACK_SEED_STRIDE = 7919


class PPOTrainer:
    def __init__(self, config: PPOConfig, ctx: StageContext | None = None):
        self.config = c = config
        self.ctx = ctx or StageContext()
        self.device, self.precision = self.ctx.device_and_precision(c)
        self.out_dir = Path(c.out_dir)
        self.dist = self.ctx.dist
        if c.mini_batch_size < self.dist.world_size:
            raise ConfigError(f"mini_batch_size ({c.mini_batch_size}) must be at least the number of processes "
                              f"({self.dist.world_size}): each process trains on its rows of every mini-batch")
        # Mini-batch shuffles; sampling draws from streams of (seed, step) instead (sampling_seed).
        self.generator = torch.Generator(device="cpu").manual_seed(c.seed)
        torch.manual_seed(c.seed)
        random.seed(c.seed)

        self.tokenizer = load_tokenizer(c.policy)
        self.prompts, prompt_ids, self.dropped_prompts = self.encoded_prompts()
        sharded = self.dist.fsdp is not None
        self.models = build_models(c, self.tokenizer, self.device, self.precision, sharded)
        if c.init_policy is not None:
            load_initial_policy(self.models, c.init_policy, self.device)
        if sharded:
            shard_models(self.models, self.dist.fsdp)
        self.optimizer = self.build_optimizer()
        total_updates = c.steps * c.ppo_epochs * c.num_mini_batches
        # Linear annealing to 0 (CleanRL): the last updates, on a policy far from the SFT model, are the smallest.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda u: 1.0 - u / total_updates) if c.anneal_lr else (lambda u: 1.0))
        self.kl_ctl = KLController(c.kl_coef, c.target_kl, c.kl_horizon)
        sampler = GatheredPolicySampler(self.models, c) if sharded else None
        self.experience = ExperienceMaker(self.models, c, prompt_ids, self.kl_ctl, self.dist, sampler)
        self.update = PPOUpdate(self.models, c, self.optimizer, self.scheduler, self.generator, self.dist)
        self.update.policy_params = self.policy_params
        self.step_index = 0  # steps completed
        self.first_eos_rate: float | None = None
        self.rollbacks = 0
        self.update_seconds = 0.0
        self.steady_seconds, self.steady_episodes = 0.0, 0  # steps after the first (warm-up) one
        self.last_experience: Experience | None = None
        self.checkpointer = stage_checkpointer(c, self.ctx)

    # The models by role, for callers that inspect them.
    policy = property(lambda self: self.models.policy)
    reference = property(lambda self: self.models.reference)
    master_weights = property(lambda self: self.models.masters)
    trained_params = property(lambda self: self.update.trained_params)

    @property
    def timing(self) -> dict[str, float]:
        return {**self.experience.seconds, "update": self.update_seconds}

    # ---------------------------------------------------------------------------------------------- setup
    def encoded_prompts(self) -> tuple[list[str], list[list[int]], int]:
        """The prompts that leave room for a response in the model's context, their ids, and how many did not."""
        c, tok = self.config, self.tokenizer
        prompts = read_prompts(Path(c.prompts))
        ids = [encode_prompt(tok, p) for p in prompts]
        context = model_context_length(c.policy) or 2048
        limit = context - c.max_new_tokens
        kept = [i for i, p in enumerate(ids) if len(p) <= limit]
        if not kept:
            raise ConfigError(f"every prompt in {c.prompts} is longer than {limit} tokens "
                              f"(the model's context minus max_new_tokens={c.max_new_tokens})")
        return [prompts[i] for i in kept], [ids[i] for i in kept], len(prompts) - len(kept)

    def build_optimizer(self) -> torch.optim.Optimizer:
        c, m = self.config, self.models
        optimizer = make_optimizer(m.policy, c.lr, c.weight_decay, master_weights=m.masters)
        self.policy_params = [p for g in optimizer.param_groups for p in g["params"]]  # masters where bf16
        if m.critic_module is not None:
            for group in make_optimizer(m.critic_module, c.critic_lr or c.lr, c.weight_decay,
                                        master_weights=m.masters).param_groups:
                optimizer.add_param_group(group)
        return optimizer

    def load_policy_weights(self, state: dict) -> None:
        """Start from other policy weights (e.g. the last round's); the fp32 masters too, where bf16."""
        load_trained_state(self.models, "policy", state)

    # -------------------------------------------------------------------------------------------- step
    @property
    def sampling_seed(self) -> int:
        """The seed of the sampling streams: after rollback n, other samples than the ones that collapsed."""
        return self.config.seed + ROLLBACK_SEED_STRIDE * self.rollbacks

    def rollout(self, step: int) -> Experience:
        return self.experience.make(step, self.sampling_seed)

    def step(self) -> dict[str, float]:
        c = self.config
        step = self.step_index
        judged_before = self.experience.seconds.get("gold_scoring", 0.0)
        t0 = time.perf_counter()
        exp = self.rollout(step)
        t1 = time.perf_counter()
        stats = self.update(exp, train_policy=step >= c.critic_warmup_steps)
        self.experience.sampler.policy_updated()
        t2 = time.perf_counter()
        self.update_seconds += t2 - t1
        judging = self.experience.seconds.get("gold_scoring", 0.0) - judged_before  # not the method's cost
        if step > 0:  # the first step pays one-off costs (kernel selection, allocator warm-up)
            self.steady_seconds += t2 - t0 - judging
            self.steady_episodes += c.batch_size
        metrics = {**self.experience_metrics(exp), **stats, "lr": self.scheduler.get_last_lr()[0],
                   "seconds_rollout": t1 - t0 - judging,  # generation and the scoring forwards
                   "seconds_update": t2 - t1,
                   **({"seconds_gold_scoring": judging} if exp.gold_scores is not None else {})}
        if "kl_mean" in metrics:
            self.kl_ctl.update(metrics["kl_mean"], c.batch_size)
        self.step_index += 1
        self.last_experience = exp
        return metrics

    def experience_metrics(self, exp: Experience) -> dict[str, float]:
        kl_per_sequence = (exp.kl * exp.mask).sum(1)  # nats per response
        # With no KL term the reference is never run, so there is no KL to report.
        kl = {"kl_mean": float(kl_per_sequence.mean()), "kl_coef": self.kl_ctl.value,
              "non_score_reward": float(-(self.kl_ctl.value * kl_per_sequence).mean())} if exp.ref_logprobs is not None \
            else {}
        return {
            "score_mean": float(exp.raw_scores.mean()),
            "score_std": float(exp.raw_scores.std()) if len(exp.raw_scores) > 1 else 0.0,
            **({"gold_score_mean": float(exp.gold_scores.mean())} if exp.gold_scores is not None else {}),
            "reward_mean": float(exp.scores.mean()),
            **kl,
            "response_length_mean": float(exp.batch.response_mask.sum(1).float().mean()),
            "eos_rate": float(exp.finished.float().mean()),
            **({"value_mean": float(masked_mean(exp.values, exp.mask))} if self.models.critic_module is not None
               else {}),
            "advantage_raw_std": float(exp.advantages.std()),
            **self.sampler_gap(exp),
        }

    @staticmethod
    def sampler_gap(exp: Experience) -> dict[str, float]:
        """How far the sampler's log-probs of its tokens are from the trainer's (the old log-probs PPO uses)."""
        sampled = exp.batch.sampled_logprobs
        if sampled is None:
            return {}
        gap = (sampled - exp.logprobs).abs() * exp.batch.response_mask
        return {"sampler_logprob_gap": float(gap.sum() / exp.batch.response_mask.sum().clamp(min=1.0)),
                "sampler_logprob_gap_max": float(gap.max())}

    def collapse_reason(self, metrics: dict[str, float]) -> str | None:
        """Why this step's policy cannot be kept, or None. Checked after every step."""
        c = self.config
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
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
    def state_dict(self) -> dict[str, Any]:
        """The run's state for a checkpoint; a collective (sharded weights and RNG states are gathered)."""
        if self.models.sharded:
            weights, optimizer = sharded_trained_states(self.models, self.optimizer)
        else:
            weights = {role: trained_state(self.models, role) for role in self.models.trained()}
            optimizer = self.optimizer.state_dict()
        return {
            "step": self.step_index,
            "sharding": self.sharding,
            "models": weights,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "rng": self.dist.rng_states(self.generator),
            "first_eos_rate": self.first_eos_rate,
            "rollbacks": self.rollbacks,
            "timing": self.timing,
        }

    @property
    def sharding(self) -> str:
        return "fsdp" if self.models.sharded else "replicated"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("sharding", "replicated")
        if saved != self.sharding:  # the optimiser state is keyed by parameter name under FSDP, by index otherwise
            raise InputError(self.checkpointer.directory,
                             f"the checkpoint was written by a {saved} run and this one is {self.sharding}: "
                             "resume it launched as it was, or remove the checkpoint to start over")
        if self.models.sharded:
            load_sharded_trained_states(self.models, self.optimizer, state["models"], state["optimizer"])
        else:
            for role, weights in state["models"].items():
                load_trained_state(self.models, role, weights)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.dist.restore_rng_state(state["rng"], generator=self.generator)
        self.step_index = state["step"]
        self.first_eos_rate = state["first_eos_rate"]
        self.rollbacks = state["rollbacks"]
        self.restore_timing(state["timing"])

    def restore_timing(self, timing: dict[str, float]) -> None:
        self.experience.seconds = {k: timing[k] for k in ("generation", "scoring")}
        self.update_seconds = timing["update"]

    def restore_last_good(self) -> None:
        """Back to the last checkpoint (this run's own); the time already spent stays counted."""
        timing = self.timing
        self.load_state_dict(self.checkpointer.load(self.device))
        self.restore_timing(timing)

    def save_checkpoint(self) -> None:
        state = self.state_dict()  # every process takes part: the RNG states are gathered
        if self.dist.is_main:
            self.checkpointer.save(state)

    def resume(self) -> int:
        """Load the checkpoint of an interrupted run of this same config, if any; returns the step it resumes at."""
        state = self.checkpointer.load(self.device) if self.config.resume else None
        if state is None:
            return 0
        self.load_state_dict(state)
        return self.step_index

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        c = self.config
        start = time.time()
        resumed_from = self.resume()
        if not resumed_from:
            self.save_checkpoint()  # step 0 is the first "last good" state to fall back to
        logger = self.ctx.metrics(self.out_dir, c.tensorboard, resume_step=resumed_from)
        stopped: str | None = None
        bar = self.ctx.progress(total=c.steps, initial=self.step_index, desc="ppo")
        history: list[dict] = []
        while self.step_index < c.steps:
            metrics = self.step()
            if self.first_eos_rate is None:
                self.first_eos_rate = metrics["eos_rate"]
            reason = self.collapse_reason(metrics)
            if reason is not None:
                logger.log(self.step_index, {**metrics, "collapse": reason})
                if c.on_collapse == "rollback" and self.rollbacks < c.max_rollbacks:
                    self.roll_back()
                    bar.write(f"ppo: {reason}; rolled back to step {self.step_index} with "
                              f"{c.rollback_lr_factor}x the learning rate")
                    continue
                collapsed_at = self.step_index
                self.restore_last_good()
                stopped = f"stopped at step {collapsed_at}: {reason}; kept the policy of step {self.step_index}"
                bar.write(f"ppo: {stopped}")
                break
            history.append(metrics)
            self.log_step(logger, metrics)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['score_mean']:.2f}", kl=f"{metrics.get('kl_mean', 0.0):.2f}",
                            eos=f"{metrics['eos_rate']:.2f}")
        bar.close()
        logger.close()
        return self.finish(history, start, resumed_from, stopped)

    def roll_back(self) -> None:
        """Back to the last good checkpoint, to retry more gently (a smaller LR) on other samples."""
        rollbacks = self.rollbacks + 1
        self.restore_last_good()
        self.rollbacks = rollbacks
        scale_learning_rate(self.optimizer, self.scheduler, self.config.rollback_lr_factor)
        self.generator.manual_seed(self.sampling_seed)

    def log_step(self, logger, metrics: dict[str, float]) -> None:
        c, step = self.config, self.step_index
        if step % c.log_every == 0 or step == c.steps:
            logger.log(step, metrics)
        if step % c.sample_every == 0 or step == 1:
            logger.log_table(step, "samples", self.sample_rows(self.last_experience))
        if self.checkpointer.due(step):
            self.save_checkpoint()

    def sample_rows(self, exp: Experience, n: int = 4) -> list[dict]:
        tok, batch = self.tokenizer, exp.batch
        rows = []
        for i in range(min(n, exp.size)):
            prompt = batch.input_ids[i, :batch.prompt_width][batch.attention_mask[i, :batch.prompt_width] == 1]
            response = batch.responses[i][batch.response_mask[i] == 1]
            rows.append({"prompt": tok.decode(prompt, skip_special_tokens=True),
                         "response": tok.decode(response, skip_special_tokens=True),
                         "score": round(float(exp.raw_scores[i]), 3),
                         **({"gold_score": round(float(exp.gold_scores[i]), 3)} if exp.gold_scores is not None else {}),
                         "kl": round(float((exp.kl[i] * exp.mask[i]).sum()), 3)})
        return rows

    # ------------------------------------------------------------------------------------------ finish
    def save_sharded_models(self) -> None:
        """Sharded: gather the whole trained models (every process) and save them from rank 0."""
        weights, _ = sharded_trained_states(self.models)
        if not self.dist.is_main:
            return
        m, classes, cpu = self.models, self.models.unsharded_classes, torch.device("cpu")
        self.save_policy(unsharded_policy(m, weights["policy"], cpu))
        if m.critic is not None:
            self.save_critic(fsdp.unsharded_copy(m.critic, weights["critic"], classes["critic"], cpu))

    def save_policy(self, policy: torch.nn.Module) -> None:
        """The policy as a plain HF directory; under LoRA the adapters too, and the merged weights."""
        if is_lora(policy):
            with atomic_directory(self.out_dir / "adapter") as tmp:
                policy.save_pretrained(tmp)  # the adapters alone, for peft users
            restore_fp32_base(policy, self.config.policy)
            policy = policy.merge_and_unload()  # a plain HF model: loads with no peft
        save_model_dir(policy, self.tokenizer, self.out_dir, self.config.max_new_tokens)

    def save_critic(self, critic: torch.nn.Module) -> None:
        with atomic_directory(self.out_dir / "critic") as tmp:
            critic.save_pretrained(tmp, safe_serialization=True)

    def save_models(self) -> None:
        # The saved weights are the fp32 masters, not their bf16 roundings.
        with self.models.masters.fp32_models():
            self.save_policy(self.models.policy)
            if self.models.critic is not None:
                self.save_critic(self.models.critic)

    def finish(self, history: list[dict], start: float, resumed_from: int, stopped: str | None) -> dict[str, Any]:
        c = self.config
        if self.models.sharded:
            self.save_sharded_models()
        elif self.dist.is_main:
            self.save_models()
        if self.dist.is_main:
            self.checkpointer.remove()
        tail = history[-max(1, len(history) // 5):] if history else []
        mean = (lambda key: statistics.fmean(m[key] for m in tail) if tail and key in tail[0] else None)
        episodes = (self.step_index - resumed_from) * c.batch_size
        return {
            "out_dir": str(self.out_dir),
            "steps": self.step_index,
            "episodes": self.step_index * c.batch_size,
            "resumed_from_step": resumed_from,
            "stopped": stopped,
            "rollbacks": self.rollbacks,
            "dropped_prompts_too_long": self.dropped_prompts,
            "episodes_per_process": self.dist.all_gather(len(self.dist.shard(c.batch_size))
                                                         * (self.step_index - resumed_from)),
            "first_score_mean": history[0]["score_mean"] if history else None,
            "final_score_mean": mean("score_mean"),
            **({"first_gold_score_mean": history[0].get("gold_score_mean") if history else None,
                "final_gold_score_mean": mean("gold_score_mean")} if c.gold_reward_model is not None else {}),
            "final_kl_mean": mean("kl_mean"),
            "final_eos_rate": mean("eos_rate"),
            "kl_coef": self.kl_ctl.value,
            "seconds_generation": self.timing["generation"],
            "seconds_scoring": self.timing["scoring"],
            "seconds_update": self.timing["update"],
            "episodes_per_second": (self.steady_episodes / self.steady_seconds) if self.steady_seconds else
            episodes / max(time.time() - start, 1e-9),
            "warmup_steps_excluded": 1 if self.steady_seconds else 0,
            "precision": self.precision,
            "device": str(self.device),
        }


class PPOStage:
    name = "ppo"
    config_class = PPOConfig
    data_parallel = True

    def outputs(self, config: PPOConfig) -> dict[str, Path]:
        out = Path(config.out_dir)
        return {"model": out, "metrics": out / "metrics.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """From the last round's policy (the SFT model in round 1); the reference stays the SFT model."""
        wired = {"policy": state.policy_dir(), "reward_model": state.outputs["reward"]["model"],
                 "prompts": state.prompts("ppo", "train_prompts"), "out_dir": state.dir / "policy",
                 "init_policy": state.outputs["ppo"]["model"] if "ppo" in state.outputs else None}
        if "gold_reward" in state.outputs:  # the held-out judge scores every step too
            wired["gold_reward_model"] = state.outputs["gold_reward"]["model"]
        return {**wired, **user, "seed": state.seed(user)}

    def run(self, config: PPOConfig, ctx: StageContext) -> dict[str, Any]:
        return PPOTrainer(config, ctx).train()


STAGE = PPOStage()


def ppo(config: PPOConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Run PPO as configured; writes the policy as a HF directory at `config.out_dir`."""
    return run_stage(STAGE, config, ctx)
