"""PPOConfig: every knob of PPO and of the critic-free methods on its loop, in one flat dataclass, checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import StageConfig
from ..errors import InputError
from ..generation import MAX_NEW_TOKENS
from .algorithms import ALGORITHMS
from .losses import LOSS_AGGREGATIONS
from ..modeling import check_model_dir


CRITICS = ("auto", "separate", "value_head", "none")


@dataclass
class PPOConfig(StageConfig):
    # -- inputs and outputs ---------------------------------------------------
    policy: Path = Path("runs/demo/sft")  # the SFT model: the policy starts here and the reference stays here
    reward_model: Path = Path("runs/demo/reward_model")
    gold_reward_model: Path | None = None  # a held-out RM that scores every step's responses too (logged, never paid)
    value_model: Path | None = None  # critic init; None: the reward model (critic="separate")
    init_policy: Path | None = None  # start the policy from these weights (a previous round's); None: from `policy`
    prompts: Path = Path("runs/demo/sft/train_prompts.jsonl")
    out_dir: Path = Path("runs/demo/policy")

    # -- rollout ----------------------------------------------------------------
    steps: int = 30  # PPO steps; each samples `batch_size` episodes
    batch_size: int = 32  # episodes (prompt + response) per step
    samples_per_prompt: int = 1  # responses per prompt in a step (batch_size / samples_per_prompt prompts)
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 1.0  # sampling temperature; log-probs use the same one
    top_p: float = 1.0

    # -- reward -------------------------------------------------------------------
    # beta (held until the KL first reaches target_kl, then adapted): reward = score - beta * KL per token.
    # TRL's default; docs/demo.md shows what larger values did to the embedded model.
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # 'k1' (log ratio) or 'k3' (always >= 0, lower variance)
    target_kl: float | None = 6.0  # adaptive beta steers the KL to this (nats per sequence); None: fixed beta
    kl_horizon: int = 128  # episodes over which beta can move by 20 % (Ziegler et al.'s 10000 suits far longer runs)
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of a response cut at max_new_tokens
    mask_truncated: bool = False  # instead: drop responses without EOS from the update
    whiten_rewards: bool = False  # scale scores to unit variance over the batch (mean kept)
    reward_clip: float | None = 10.0  # clip scores to [-c, c] before the KL term

    # -- advantages and losses ---------------------------------------------------------
    # 'ppo' (GAE against a critic), or critic-free: 'grpo', 'rloo', 'reinforce_pp' (ppo.algorithms).
    algorithm: str = "ppo"
    group_std_normalize: bool = True  # grpo: divide by the group's std (Shao et al.); False: Dr. GRPO (Liu et al.)
    gamma: float = 1.0  # no discount: the score arrives once, at the end
    lam: float = 0.95
    whiten_advantages: bool = True  # ppo (GAE); reinforce_pp always whitens, grpo and rloo baseline by group
    loss_aggregation: str = "token_mean"  # or 'sequence_mean': every response weighs the same (losses.aggregation_weights)
    kl_loss_coef: float = 0.0  # > 0: also a k3 KL(policy || reference) term in the loss (GRPO); kl_coef is the reward's
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1

    # -- optimisation -------------------------------------------------------------------
    ppo_epochs: int = 4
    mini_batch_size: int = 16  # episodes per optimiser step
    gradient_accumulation_steps: int = 1  # micro-batches per mini-batch (memory only: same result)
    lr: float = 1e-4  # right for the embedded 5 M-parameter model; ~1e-6..1e-5 for 100 M+ (or LoRA at ~1e-4)
    critic_lr: float | None = None  # None: the same as lr
    anneal_lr: bool = True  # linear decay to 0 over the run (CleanRL): late updates smaller
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    # -- critic ------------------------------------------------------------------------------
    # 'separate' (own model, init from the RM), 'value_head' (on the policy trunk), 'none';
    # 'auto': 'separate' for ppo, 'none' for the critic-free algorithms.
    critic: str = "auto"
    critic_warmup_steps: int = 0  # first steps train the critic only, so early advantages are not noise

    # -- memory ----------------------------------------------------------------------------
    lora_r: int = 0  # > 0: train LoRA adapters; the reference is the same model with adapters off
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False

    # -- guards, logging, checkpoints -------------------------------------------------------
    on_collapse: str = "stop"  # 'stop' or 'rollback' (to the last good checkpoint) on NaN, KL/ratio blow-up, EOS collapse
    max_rollbacks: int = 3  # rollbacks before a collapse stops the run anyway
    rollback_lr_factor: float = 0.5  # each rollback retries with the learning rate times this
    kl_stop_factor: float = 5.0  # collapse when mean KL > factor * target_kl (adaptive beta only)
    ratio_stop: float = 50.0  # collapse when a token's policy ratio exceeds this
    min_eos_rate: float = 0.05  # collapse when fewer responses than this end with EOS (after a good start)
    log_every: int = 1
    sample_every: int = 10  # steps between sample-completion tables
    checkpoint_every: int = 5  # steps; the last good state a collapse falls back to (0: only at the start and end)
    resume: bool = True  # continue from out_dir/checkpoint if it exists
    tensorboard: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        check_model_dir(self.policy)
        check_model_dir(self.reward_model)
        if self.gold_reward_model is not None:
            check_model_dir(self.gold_reward_model)
        for path in (self.value_model, self.init_policy):
            if path is not None:
                check_model_dir(path)
        if not Path(self.prompts).exists():
            raise InputError(self.prompts, "no such prompts file")
        r = self.require
        r(self.steps >= 1 and self.batch_size >= 1 and self.max_new_tokens >= 1,
          "steps, batch_size and max_new_tokens must be >= 1")
        # Batch-size algebra: a step's episodes split into whole mini-batches, each into whole micro-batches.
        r(self.mini_batch_size >= 1 and self.batch_size % self.mini_batch_size == 0,
          f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        r(self.gradient_accumulation_steps >= 1 and self.mini_batch_size % self.gradient_accumulation_steps == 0,
          f"mini_batch_size ({self.mini_batch_size}) must be a multiple of gradient_accumulation_steps "
          f"({self.gradient_accumulation_steps})")
        r(self.samples_per_prompt >= 1 and self.batch_size % self.samples_per_prompt == 0,
          f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt ({self.samples_per_prompt})")
        self.validate_algorithm()
        r(self.loss_aggregation in LOSS_AGGREGATIONS,
          f"loss_aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}, got '{self.loss_aggregation}'")
        r(self.kl_loss_coef >= 0, "kl_loss_coef must be >= 0")
        r(self.temperature > 0, "temperature must be > 0")
        r(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        r(self.kl_coef >= 0, "kl_coef must be >= 0")
        r(self.kl_estimator in ("k1", "k3"), f"kl_estimator must be 'k1' or 'k3', got '{self.kl_estimator}'")
        r(self.target_kl is None or self.target_kl > 0, "target_kl must be > 0 (or null for a fixed kl_coef)")
        r(self.kl_horizon >= 1, "kl_horizon must be >= 1")
        r(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        r(self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0")
        r(self.ppo_epochs >= 1, "ppo_epochs must be >= 1")
        r(self.lr > 0 and (self.critic_lr is None or self.critic_lr > 0), "lr and critic_lr must be > 0")
        r(self.critic_warmup_steps >= 0 and self.critic_warmup_steps < self.steps,
          "critic_warmup_steps must be in [0, steps)")
        r(self.lora_r >= 0, "lora_r must be >= 0 (0 trains all weights)")
        r(self.on_collapse in ("stop", "rollback"), "on_collapse must be 'stop' or 'rollback'")
        r(self.max_rollbacks >= 0 and 0 < self.rollback_lr_factor <= 1,
          "max_rollbacks must be >= 0 and rollback_lr_factor in (0, 1]")
        r(self.reward_clip is None or self.reward_clip > 0, "reward_clip must be > 0 (or null)")
        r(not (self.mask_truncated and self.missing_eos_penalty),
          "choose one of missing_eos_penalty and mask_truncated (set missing_eos_penalty: null to mask)")
        r(self.checkpoint_every >= 0 and self.sample_every >= 1 and self.log_every >= 1,
          "checkpoint_every must be >= 0; sample_every and log_every >= 1")

    def validate_algorithm(self) -> None:
        r = self.require
        r(self.algorithm in ALGORITHMS, f"algorithm must be one of {', '.join(ALGORITHMS)}, got '{self.algorithm}'")
        r(self.critic in CRITICS, f"critic must be one of {', '.join(CRITICS)}, got '{self.critic}'")
        algorithm = ALGORITHMS[self.algorithm]
        if algorithm.learns_critic:
            r(self.critic != "none", f"algorithm '{self.algorithm}' learns a critic: critic must not be 'none'")
        else:
            r(self.critic in ("auto", "none"),
              f"algorithm '{self.algorithm}' has no critic: drop critic: {self.critic} (or use algorithm: ppo)")
            r(self.value_model is None and self.critic_warmup_steps == 0,
              f"algorithm '{self.algorithm}' has no critic: value_model and critic_warmup_steps do not apply")
        r(self.samples_per_prompt >= algorithm.min_group,
          f"algorithm '{self.algorithm}' compares responses to the same prompt: samples_per_prompt must be "
          f">= {algorithm.min_group}, got {self.samples_per_prompt}")

    @property
    def uses_reference(self) -> bool:
        """Is there a KL term anywhere? Without one (beta 0, no KL loss, no target) the reference is never run."""
        return self.kl_coef > 0 or self.kl_loss_coef > 0 or self.target_kl is not None

    @property
    def critic_type(self) -> str:
        """'separate', 'value_head' or 'none', with 'auto' resolved by the algorithm."""
        if self.critic != "auto":
            return self.critic
        return "separate" if ALGORITHMS[self.algorithm].learns_critic else "none"

    @property
    def micro_batch_size(self) -> int:
        return self.mini_batch_size // self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.samples_per_prompt

    @property
    def num_mini_batches(self) -> int:
        return self.batch_size // self.mini_batch_size
