"""The PPO update: `ppo_epochs` passes of clipped policy and value losses over one `Experience`.

The critic-free algorithms run the same update without the value loss.

Each pass shuffles the episodes into mini-batches; each mini-batch is one optimiser step,
optionally split into micro-batches for memory. Losses are weighted token sums divided by the
mini-batch's total weight (`loss_aggregation`: per token, or per response), so however the
micro-batches split a mini-batch, the update is the same.

Under several processes every process holds the whole experience and draws the same shuffle;
each runs its block of every mini-batch (micro-batches of `micro_batch_size` rows) and the
gradients are summed over the processes before the optimiser step, which is then the same step
in every process: the one-process step, up to the order of floating-point sums. Sharded by
FSDP, each process steps its shard of every parameter, the gradients having been summed by FSDP
in each backward.
"""

from __future__ import annotations

import torch

from ..distributed import SINGLE_PROCESS, Distributed
from ..training import optimizer_step
from .config import PPOConfig
from .experience import Experience
from .losses import aggregation_weights, clipped_value_loss, entropy_from_logits, kl_penalty, ppo_policy_loss
from .models import RLModels

STAT_SUMS = ("pg_loss", "vf_loss", "kl_loss", "clipped", "vf_clipped", "approx_kl", "tokens", "entropy",
             "entropy_tokens")


class PPOUpdate:
    def __init__(self, models: RLModels, config: PPOConfig, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                 dist: Distributed = SINGLE_PROCESS):
        self.models, self.config = models, config
        self.optimizer, self.scheduler = optimizer, scheduler
        self.generator = generator  # mini-batch shuffles: the same in every process
        self.dist = dist
        self.trained_params = [p for g in optimizer.param_groups for p in g["params"]]  # policy + critic
        self.policy_params: list[torch.nn.Parameter] = []  # set by the trainer: what critic warm-up freezes

    def __call__(self, exp: Experience, train_policy: bool) -> dict[str, float]:
        """Every optimiser step of one PPO step; returns the statistics averaged over its tokens."""
        c, m = self.config, self.models
        critic = m.critic_module
        modules = [m.policy] + ([critic] if critic is not None else [])
        for module in modules:
            module.train()  # dropout is off (disable_dropout); train mode lets gradient checkpointing work
        sums = dict.fromkeys(STAT_SUMS, 0.0)
        ratio_max, grad_norm = 0.0, torch.zeros(())
        weights = aggregation_weights(exp.mask, c.loss_aggregation)  # (B, R): what each token counts for
        for epoch in range(c.ppo_epochs):
            order = torch.randperm(exp.size, generator=self.generator)
            for mb_start in range(0, exp.size, c.mini_batch_size):
                mb_rows = order[mb_start:mb_start + c.mini_batch_size]
                # The mean over the whole mini-batch, however processes and micro-batches split it.
                mb_weight = weights[mb_rows].sum().clamp(min=1.0)
                # This process's block of the mini-batch's rows in episode order: with one mini-batch
                # that is the shard it sampled, whose rollout forwards the first update can reuse.
                share = self.dist.shard(len(mb_rows))
                mine = mb_rows.sort().values[share.start:share.stop]
                for rows in self.micro_batches(mine, mb_rows):
                    ratio_max = max(ratio_max, self.micro_batch(exp, rows, weights, mb_weight, train_policy, epoch,
                                                                sums))
                if not m.sharded:  # FSDP sums the gradients itself, in each backward
                    self.dist.all_reduce_gradients(self.trained_params)  # the shares add up to the mini-batch's
                frozen = () if train_policy else self.policy_params  # critic warm-up: the policy must not move
                grad_norm = optimizer_step(self.optimizer, self.scheduler, m.masters, self.trained_params,
                                           c.max_grad_norm, frozen)
        for module in modules:
            module.eval()
        sums = dict(zip(sums, self.dist.all_reduce_sum(list(sums.values()))))
        ratio_max = self.dist.all_reduce_max(ratio_max)
        n = max(sums["tokens"], 1.0)
        kl_loss = {"kl_loss": sums["kl_loss"] / n} if c.kl_loss_coef else {}
        value = {"vf_loss": sums["vf_loss"] / n, "vf_clipfrac": sums["vf_clipped"] / n} if critic is not None else {}
        return {"pg_loss": sums["pg_loss"] / n, **value, **kl_loss, "clipfrac": sums["clipped"] / n,
                "approx_kl": sums["approx_kl"] / n,
                "entropy_mean": sums["entropy"] / max(sums["entropy_tokens"], 1.0), "ratio_max": ratio_max,
                "grad_norm": float(grad_norm)}

    def micro_batches(self, mine: torch.Tensor, mb_rows: torch.Tensor) -> list[torch.Tensor | None]:
        """This process's micro-batches of its rows `mine` of the mini-batch `mb_rows`.

        Sharded, every process must run as many forwards and backwards as the others (each is a
        collective), so a process with fewer rows than the largest share ends with micro-batches
        of None: one row that counts for nothing.
        """
        size = self.config.micro_batch_size
        own = [mine[start:start + size] for start in range(0, len(mine), size)]
        if not self.models.sharded:
            return own
        largest_share = -(-len(mb_rows) // self.dist.world_size)
        return own + [None] * (-(-largest_share // size) - len(own))

    def micro_batch(self, exp: Experience, rows: torch.Tensor | None, weights: torch.Tensor, mb_weight: torch.Tensor,
                    train_policy: bool, epoch: int, sums: dict[str, float]) -> float:
        """Forward, loss and backward of one micro-batch; adds its statistics to `sums`; returns its max ratio.
        `rows` None: a sharded process's extra micro-batch (see micro_batches), of weight 0."""
        c, m = self.config, self.models
        counts = rows is not None
        if exp.live is not None:  # the rollout's forwards, of this process's rows (the same set, in its order)
            rows = exp.live_rows
            (logprobs, logits, values), exp.live = exp.live, None
        else:
            rows = rows if counts else torch.zeros(1, dtype=torch.long)
            logprobs, logits, values = m.policy_and_values(exp.batch.select(rows))
        mask, w = exp.mask[rows], weights[rows] * counts
        pg_sum, pg_stats = ppo_policy_loss(logprobs, exp.logprobs[rows], exp.advantages[rows], w, c.cliprange)
        policy_loss = pg_sum
        if c.kl_loss_coef:  # k3: unbiased and >= 0 on the policy's own samples, as GRPO uses it
            kl_sum = (kl_penalty(logprobs, exp.ref_logprobs[rows], "k3") * w).sum()
            policy_loss = policy_loss + c.kl_loss_coef * kl_sum
            sums["kl_loss"] += float(kl_sum.detach())
        loss = policy_loss if train_policy else 0.0
        if m.critic_module is not None:
            vf_sum, vf_clipped = clipped_value_loss(values, exp.values[rows], exp.returns[rows], w, c.cliprange_value)
            loss = loss + c.vf_coef * vf_sum
            sums["vf_loss"] += float(vf_sum.detach())
            sums["vf_clipped"] += float(vf_clipped)
        # FSDP averages the processes' gradients: scaled by N, the shares average to their sum.
        (loss / mb_weight * (self.dist.world_size if m.sharded else 1)).backward()
        m.masters.accumulate_grads()  # bf16: weight grads -> fp32 master grads
        if not counts:
            return 0.0
        with torch.no_grad():
            if epoch == 0:  # entropy of the rollout policy, measured once
                sums["entropy"] += float((entropy_from_logits(logits) * mask).sum())
                sums["entropy_tokens"] += float(mask.sum())
            sums["pg_loss"] += float(pg_sum)
            sums["clipped"] += float(pg_stats["clipped_tokens"])
            sums["approx_kl"] += float(pg_stats["approx_kl_sum"])
            sums["tokens"] += float(w.sum())
        return float(pg_stats["ratio_max"])
