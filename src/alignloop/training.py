"""Pieces every training stage shares: optimiser, LR schedule, the LM-loss loop, perplexity.

Pretraining and SFT both minimise next-token cross-entropy on the positions
whose label is not -100, so one loop serves both; the reward and PPO stages
reuse the optimiser and schedule. Under several processes (distributed.py) the
loop trains each process on its rows of every global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import PreTrainedModel

from . import fsdp
from .checkpoint import Checkpointer
from .device import autocast
from .distributed import SINGLE_PROCESS, Distributed
from .errors import AlignloopError, InputError
from .mixed_precision import MasterWeights
from .progress import progress

IGNORE = -100  # label value that cross-entropy skips (prompt and padding positions)


class TrainingDiverged(AlignloopError):
    """The loss or the gradients stopped being finite numbers: the run stops, its checkpoints untouched."""


def check_finite(desc: str, step: int, loss: float, grad_norm: torch.Tensor,
                 checkpointer: Checkpointer | None) -> None:
    """Stop a training loop whose step `step` (1-based) gave a non-finite loss or gradient norm.

    Nothing from that step on is saved, so the last checkpoint stays the last good state.
    """
    if math.isfinite(loss) and bool(torch.isfinite(grad_norm)):
        return
    kept = (f"the last good state is the checkpoint in {checkpointer.directory}"
            if checkpointer is not None and checkpointer.every else "no checkpoint was kept (checkpoint_every: 0)")
    raise TrainingDiverged(f"{desc}: non-finite {'loss' if not math.isfinite(loss) else 'gradients'} at step "
                           f"{step} (loss {loss}); {kept}: lower lr or check the data, then rerun")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   master_weights: "MasterWeights | None" = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying biases and norms just hurts.

    With `master_weights`, the optimiser steps the fp32 masters of the model's bf16 matmul weights.
    """
    params = (master_weights.optimizer_params(model) if master_weights is not None
              else [p for p in model.parameters() if p.requires_grad])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass; the per-tensor loop is most of an RL step's
    # non-matmul time on small models.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def model_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    precision: str) -> tuple[MasterWeights, torch.optim.AdamW, list[torch.nn.Parameter]]:
    """The optimiser set-up for training one model (pretrain, SFT, reward model).

    Returns the master weights (bf16: the model computes with bf16 matmul weights and the optimiser
    steps fp32 masters, see mixed_precision.py; fp32: a no-op), the optimiser, and the parameters to
    clip, in the model's parameter order with masters in place of bf16 weights, so the gradient
    norm's float sum adds up exactly as it does without masters.
    """
    masters = MasterWeights([model], enabled=precision == "bf16")
    optimizer = make_optimizer(model, lr, weight_decay, master_weights=masters)
    return masters, optimizer, masters.optimizer_params(model)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most max_norm; returns the norm before.

    The same result as `torch.nn.utils.clip_grad_norm_`, cheaper on the CPU: the squared norm is a
    dot product per gradient (faster there than `linalg.vector_norm`), and the gradients are
    rescaled only when they are actually clipped (torch multiplies every gradient by a coefficient
    of 1.0 otherwise). A non-finite norm leaves the gradients alone; the step it poisons is caught
    by the caller's NaN guard.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = isinstance(grads[0], DTensor)  # FSDP: each process holds one shard of every gradient
    squares = []
    for g in grads:
        flat = (g.to_local() if sharded else g).reshape(-1).float()
        squares.append(torch.dot(flat, flat).to(flat.device))
    total_square = torch.stack(squares).sum()
    if sharded:
        torch.distributed.all_reduce(total_square)  # the shards' squares add up to the whole gradient's
    total_norm = total_square.sqrt()
    coef = max_norm / (float(total_norm) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total_norm


class ModelOptimization:
    """The optimiser side of training one model (pretrain, SFT, reward model, DPO), replicated or sharded.

    Replicated (one process, or DDP's full copy in each): bf16 matmul weights with fp32 masters
    (`model_optimizer`), the forwards through `dist.wrap`'s DDP module. Sharded (the launch asked
    for FSDP, fsdp.py): each process holds 1/N of the fp32 parameters, which the optimiser steps
    directly, and FSDP computes in bf16 itself. Either way the loop is the same: forward through
    `module`, `after_backward()`, `step()`, and `finish()` hands back a plain fp32 model.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, precision: str, dist: Distributed,
                 forward: torch.nn.Module | None = None):
        """`forward`: the module the training forwards call, if not the model itself (a wrapper whose
        forward runs the model's parts separately, which DDP must see as one call)."""
        self.model, self.dist = model, dist
        self.sharding = "fsdp" if dist.fsdp is not None else "replicated"
        if dist.fsdp is not None:
            self.model_class, self.device = type(model), next(model.parameters()).device
            self.module = forward or model  # the FSDP root: its call gathers the unit of the non-block weights
            # State dicts are read through the root, keyed by its names: `prefix` + the model's own.
            self.prefix = next(f"{name}." for name, m in self.module.named_modules() if m is model) if forward else ""
            fsdp.shard(model, dist.fsdp, precision, root=self.module)
            self.masters = MasterWeights([model], enabled=False)  # the sharded fp32 parameters are the masters
            self.optimizer = make_optimizer(model, lr, weight_decay)
            self.params = [p for p in model.parameters() if p.requires_grad]
        else:
            self.masters, self.optimizer, self.params = model_optimizer(model, lr, weight_decay, precision)
            self.module = dist.wrap(forward or model)  # after the masters: DDP's gradient buckets are for the bf16 weights

    def after_backward(self) -> None:
        self.masters.accumulate_grads()

    def step(self, scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float) -> torch.Tensor:
        return optimizer_step(self.optimizer, scheduler, self.masters, self.params, max_grad_norm)

    def state_dict(self) -> dict:
        """The model's fp32 weights and the optimiser's state for a checkpoint; under FSDP a collective
        whose result only rank 0 holds (the one that saves it)."""
        if self.sharding == "fsdp":
            return {"model": self.model_state(fsdp.full_state_dict(self.module)),
                    "optimizer": fsdp.full_optimizer_state(self.module, self.optimizer), "sharding": "fsdp"}
        return {"model": self.masters.state_dict(0), "optimizer": self.optimizer.state_dict(), "sharding": "replicated"}

    def model_state(self, root_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's entries of a state dict of the FSDP root, under the model's own names."""
        return {k[len(self.prefix):]: v for k, v in root_state.items() if k.startswith(self.prefix)}

    def load_state_dict(self, state: dict, source: object) -> None:
        saved = state.get("sharding", "replicated")
        if saved != self.sharding:  # the optimiser state is keyed by parameter name under FSDP, by index otherwise
            raise InputError(source, f"the checkpoint was written by a {saved} run and this one is {self.sharding}: "
                                     f"resume it launched as it was, or remove the checkpoint to start over")
        if self.sharding == "fsdp":
            fsdp.load_full_state_dict(self.module, {self.prefix + k: v for k, v in state["model"].items()})
            fsdp.load_full_optimizer_state(self.module, self.optimizer, state["optimizer"])
        else:
            self.masters.load_state_dict(0, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])

    def finish(self) -> torch.nn.Module:
        """Training is over: the plain fp32 model, in every process (the caller evaluates and saves it)."""
        if self.sharding == "fsdp":
            state = self.model_state(fsdp.full_state_dict(self.module, everywhere=True))
            self.optimizer.state.clear()
            return fsdp.unsharded_copy(self.model, state, self.model_class, self.device)
        self.masters.release()
        return self.model


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   masters: MasterWeights, params: list[torch.nn.Parameter], max_grad_norm: float,
                   frozen: list[torch.nn.Parameter] | tuple = ()) -> torch.Tensor:
    """One optimiser step of every training loop: clip, step, copy the masters back, advance the LR.

    `frozen` parameters have their gradients dropped before the step, so even a zero gradient
    cannot move them through weight decay or Adam's momentum. Returns the norm before clipping.
    """
    grad_norm = clip_grad_norm(params, max_grad_norm)
    for p in frozen:
        p.grad = None
    optimizer.step()
    masters.copy_masters_to_models()  # bf16: the model computes with the new weights
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                        factor: float) -> None:
    """Multiply the learning rate from now on by `factor`, keeping the schedule's shape.

    LambdaLR sets lr = base_lr * schedule(step) at every step, so the base LRs are scaled as well
    as the current ones; both are in the scheduler's and optimiser's state, so a resume keeps them.
    """
    for group in optimizer.param_groups:
        group["lr"] *= factor
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  final_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `final_fraction` of the peak LR."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LMBatch:
    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq), 0 on padding (right padding only)
    labels: torch.Tensor  # (batch, seq), IGNORE where no loss is taken

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def target_count(self) -> int:
        """The tokens a loss is taken on: labels past the first position (each predicted from the one before)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def rows(self, index: range, device: torch.device) -> "LMBatch":
        """Rows `index` on `device`, cut to their longest row (the whole batch's width when it is there)."""
        rows = slice(index.start, index.stop)
        width = int(self.attention_mask[rows].sum(dim=1).max())
        return LMBatch(*(t[rows, :width].to(device) for t in (self.input_ids, self.attention_mask, self.labels)))

    def shard(self, dist: Distributed, device: torch.device) -> tuple["LMBatch", int]:
        """This process's rows of a global batch on `device`, and how many they are.

        A process left without rows (a last batch smaller than the world) gets the first row with
        no targets: it runs the forward and backward that DDP's gradient all-reduce waits for, and
        adds exactly zero.
        """
        index = dist.shard(len(self))
        if len(index):
            return self.rows(index, device), len(index)
        empty = self.rows(range(0, 1), device)
        return LMBatch(empty.input_ids, empty.attention_mask, torch.full_like(empty.labels, IGNORE)), 0


@dataclass
class LMTraining:
    """What `train_lm` reports."""

    losses: list[float]  # per optimiser step, the global batch's mean token loss
    examples_per_process: list[int]  # rows (sequences) each process trained on, in rank order
    tokens: int  # target tokens trained on, over every process (this run's steps, not a resumed run's earlier ones)
    seconds: float = field(compare=False)  # the training loop's time (this run's); runs compare by their numbers
    model: torch.nn.Module | None = field(default=None, compare=False, repr=False)  # the trained fp32 model

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def lm_loss_sum(model: PreTrainedModel, batch: LMBatch, precision: str) -> tuple[torch.Tensor, int]:
    """Sum of token losses and the token count, so accumulation over batches weights every token equally."""
    device = batch.input_ids.device
    with autocast(device, precision):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # Shift: position t predicts token t+1. Cross-entropy in fp32 whatever the matmul dtype, over the
    # labelled positions only: the fp32 copy and its log-softmax are vocabulary-wide per position, so
    # prompts and padding (SFT's unlabelled tokens) would otherwise cost as much memory as responses.
    targets = batch.labels[:, 1:]
    labelled = targets != IGNORE
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][labelled].float(), targets[labelled], reduction="sum")
    return loss, int(labelled.sum())


def eval_batch_size(batch_size: int, dist: Distributed) -> int:
    """A held-out pass's batch: one process's share of the training batch, so evaluation never sets a
    memory peak training does not reach (vocabulary-wide logits grow with the batch)."""
    return max(1, batch_size // dist.world_size)


@torch.no_grad()
def perplexity(model: PreTrainedModel, batches: list[LMBatch], precision: str,
               dist: Distributed = SINGLE_PROCESS) -> float:
    """exp(mean token loss) over `batches`; several processes each take a block of the batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in dist.shard(len(batches)):
        loss, n = lm_loss_sum(model, batches[i], precision)
        total += loss.item()
        count += n
    total, count = dist.all_reduce_sum([total, count])
    model.train(was_training)
    return math.exp(total / max(count, 1))


def train_lm(model: PreTrainedModel, batches: Iterator[LMBatch], total_steps: int, lr: float,
             weight_decay: float, warmup_steps: int, grad_clip: float, precision: str, desc: str,
             checkpointer: Checkpointer | None = None, dist: Distributed = SINGLE_PROCESS) -> LMTraining:
    """One optimiser step per global batch; returns the per-step mean token loss and rows per process.

    With a `checkpointer`, the run's state is saved every `checkpointer.every` steps and an
    interrupted run of the same config resumes from it: the batch stream is seeded, so skipping
    the batches already trained on puts it where it was, and the result is the uninterrupted one.

    Under several processes (`dist`), every process draws the same global batch and trains on its
    rows (`LMBatch.shard`), its loss sum divided by the global batch's token count; the gradients
    of these shares add up (`Distributed.backward`), so each step is the one-process step up to the
    order of the float sums.
    """
    device = next(model.parameters()).device
    model.train()
    training = ModelOptimization(model, lr, weight_decay, precision, dist)
    scheduler = warmup_cosine(training.optimizer, warmup_steps, total_steps)
    losses: list[float] = []
    start, examples = 0, 0
    state = checkpointer.load(device) if checkpointer is not None else None
    if state is not None:
        training.load_state_dict({**state["models"], "optimizer": state["optimizer"],
                                  "sharding": state.get("sharding", "replicated")}, checkpointer.directory)
        scheduler.load_state_dict(state["scheduler"])
        dist.restore_rng_state(state["rng"], checkpointer.log)
        losses, start = list(state["losses"]), state["step"]
        for _ in range(start):
            examples += len(dist.shard(len(next(batches))))
    bar = progress(total=total_steps, initial=start, desc=desc, disable=not dist.is_main)
    began, tokens = time.perf_counter(), 0
    for step in range(start, total_steps):
        batch = next(batches, None)
        if batch is None:
            break
        n_tokens = batch.target_count()  # the global batch's: every process divides by the same count
        tokens += n_tokens
        rows, n_rows = batch.shard(dist, device)
        examples += n_rows
        loss_sum, _ = lm_loss_sum(training.module, rows, precision)
        loss = loss_sum / max(n_tokens, 1)
        dist.backward(loss)
        training.after_backward()
        grad_norm = training.step(scheduler, grad_clip)
        losses.append(dist.all_reduce_sum([loss.item()])[0])
        check_finite(desc, step + 1, losses[-1], grad_norm, checkpointer)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if checkpointer is not None and checkpointer.due(step + 1) and step + 1 < total_steps:
            rngs = dist.rng_states()
            trained = training.state_dict()  # every process: a collective under FSDP
            if dist.is_main:
                checkpointer.save({"step": step + 1, "models": {"model": trained["model"]},
                                   "optimizer": trained["optimizer"], "sharding": trained["sharding"],
                                   "scheduler": scheduler.state_dict(), "rng": rngs, "losses": losses})
    bar.close()
    seconds = time.perf_counter() - began
    model = training.finish()  # the caller gets (and saves) the fp32 weights
    model.eval()  # dropout off for whatever comes next (generation, scoring)
    return LMTraining(losses, dist.all_gather(examples), tokens, seconds, model)
