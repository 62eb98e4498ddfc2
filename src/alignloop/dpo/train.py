"""The `dpo` stage: DPO or IPO on preference pairs and rankings, from the SFT model. No reward model, no sampling.

Data: what the reward model reads (`reward.data.read_preferences`): pairs and K-way rankings,
every strictly ranked pair of an item one (chosen, rejected) pair, ties none. The held-out
pairs are those of whole prompts held out (`reward.train.split_by_prompt`), or `held_out_data`.

The reference is the SFT model frozen: before the first update the model, still the SFT model,
computes the log-probs of every chosen and rejected response (training and held-out) once,
so no second copy is kept in memory while training. They go into every checkpoint, so a
resumed run reads them instead of needing the SFT weights again.

Where the time goes and what we do about it (as in the reward model's training):
- a pair is laid out as its prompt once, then the chosen and the rejected response, in packed
  rows under a shared-prefix mask (`reward.train.pack_rows`, `shared_prefix_mask`): each
  response sees the prompt and itself, exactly as in two separate sequences, so a pair costs
  prompt + chosen + rejected tokens, with next to no padding (TRL runs prompt + chosen and
  prompt + rejected as two padded rows). Checked per architecture, not assumed (`packing_works`);
- the LM head runs only on the positions that predict a response token (the prompt's last
  token predicts the first token of both responses), not on every position;
- bf16 autocast where the `choose_precision` probe measured it faster, fp32 masters for the optimiser.
Dropout is off, as in every alignloop trainer: the policy's log-probs at step 0 equal the reference's.

Under FSDP (examples/accelerate/fsdp.yaml) the reference log-probs come from the whole model, before
it is sharded; from then on every forward, training and held-out, goes through the FSDP root
(`PairScorer`), each process in step with the others (`Scorer.logprobs`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import PreTrainedModel

from ..checkpoint import Checkpointer
from ..config import StageConfig
from ..device import autocast
from ..distributed import SINGLE_PROCESS, Distributed
from ..errors import InputError
from ..jsonl import read_jsonl
from ..logprobs import token_logprobs
from ..modeling import check_model_dir, load_causal_lm, load_tokenizer, max_length_for, save_model_dir
from ..prompts import DEFAULT_MAX_LENGTH, pad_right
from ..reward.data import Preference
from ..reward.train import (EncodedItem, check_preference_schedule, encode_items, length_buckets, load_splits,
                            pack_rows, shared_prefix_mask, split_rankings, unit_size)
from ..stage import RoundState, StageContext, run_stage, section_number, stage_checkpointer
from ..training import ModelOptimization, check_finite, warmup_cosine
from .losses import LOSSES, PreferenceLoss, dpo_loss, ipo_loss, reward_accuracy


@dataclass
class DPOConfig(StageConfig):
    model: Path = Path("runs/demo/sft")  # the SFT model: the policy starts here, and frozen it is the reference
    data: Path = Path("runs/demo/preferences.jsonl")  # pairs and/or rankings: a file or a directory of them
    held_out_data: Path | None = None  # None: hold out `held_out_fraction` of the prompts of `data`
    held_out_fraction: float = 0.05
    out_dir: Path = Path("runs/demo/dpo")
    loss: str = "dpo"  # 'dpo' (Rafailov et al. 2023) or 'ipo' (Azar et al. 2023)
    beta: float = 0.1  # DPO's β (how far from the reference the reward lets the policy go); IPO's τ
    label_smoothing: float = 0.0  # conservative DPO: the probability that a label is flipped (dpo only)
    epochs: float = 1.0
    batch_size: int = 32  # pairs per micro-batch
    gradient_accumulation_steps: int = 1
    lr: float = 5e-5  # right for the embedded 3.7 M-parameter model; ~5e-7..1e-6 for models of 1 B+ parameters
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the optimiser steps with a linear warm-up; cosine decay after
    grad_clip: float = 1.0
    max_length: int | None = None  # tokens of prompt + response + EOS (None: 192, or the model's context if shorter)
    pack_width: int = 256  # pack a batch's pairs (prompt once + chosen + rejected) into rows this wide (0: pad)
    eval_every: int = 50  # optimiser steps between held-out evaluations (0: only after the last step)
    eval_batch_size: int = 64  # pairs per forward when computing reference log-probs and evaluating
    checkpoint_every: int = 100  # optimiser steps between checkpoints a killed run resumes from (0: none)
    resume: bool = True  # continue from out_dir/checkpoint when an earlier run of this config left one
    tensorboard: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        check_model_dir(self.model)
        self.max_length = max_length_for(self.model, self.max_length, DEFAULT_MAX_LENGTH, type(self).__name__)
        for path in (self.data, self.held_out_data):
            if path is not None and not Path(path).exists():
                raise InputError(path, "no such file or directory")
        self.require(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        self.require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        self.require(0 <= self.label_smoothing < 0.5,
                     f"label_smoothing is the probability a label is flipped, in [0, 0.5); got {self.label_smoothing}")
        self.require(self.label_smoothing == 0 or self.loss == "dpo",
                     "label_smoothing is conservative DPO's: use it with loss: dpo, or set it to 0")
        check_preference_schedule(self)
        self.require(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        self.require(self.checkpoint_every >= 0 and self.eval_every >= 0,
                     "checkpoint_every and eval_every must be >= 0 (0: none / only at the end)")
        self.require(isinstance(self.resume, bool) and isinstance(self.tensorboard, bool),
                     "resume and tensorboard must be true or false")


# -- pairs, batches and sequence log-probs -------------------------------------------------------

def ranked_pairs(items: list[Preference]) -> list[Preference]:
    """Every strictly ranked pair of every item as its own (chosen, rejected) pair; tied responses give none."""
    return [Preference(it.prompt, [it.responses[i], it.responses[j]], [0, 1], source=it.source)
            for it in items for i, j in it.comparisons()]


@dataclass
class PairBatch:
    """Pairs ready for one forward; sequence 2i is pair i's chosen response, 2i + 1 its rejected one."""

    input_ids: torch.Tensor  # (rows, width): packed rows of pairs, or one padded row per sequence
    attention_mask: torch.Tensor  # packed: (rows, 1, width, width) bool shared-prefix mask; padded: (rows, width)
    position_ids: torch.Tensor | None  # (rows, width) as each sequence would see alone; None when padded
    rows: torch.Tensor  # (tokens,): row of the position that predicts each response token
    columns: torch.Tensor  # (tokens,): its column
    labels: torch.Tensor  # (tokens,): the response token predicted there (EOS included)
    token_index: torch.Tensor  # (2 * pairs, longest response): each sequence's tokens; `tokens` on padding
    lengths: torch.Tensor  # (2 * pairs,): response tokens of each sequence
    real_tokens: int

    @property
    def size(self) -> int:
        return self.lengths.shape[0] // 2


def collate_pairs(pairs: list[EncodedItem], pad_id: int, device: torch.device, pack_width: int = 0) -> PairBatch:
    """Packed rows (pack_width > 0) or padded rows, and where each response token is predicted."""
    rows: list[int] = []
    columns: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []  # per sequence: (first token, length) in the lists above

    def add(row: int, first_predictor: int, start: int, response: list[int]) -> None:
        # The first response token is predicted at the prompt's last position, every later one at the token before it.
        spans.append((len(labels), len(response)))
        rows.extend([row] * len(response))
        columns.extend([first_predictor, *range(start, start + len(response) - 1)])
        labels.extend(response)

    t = lambda x, **kw: torch.tensor(x, device=device, **kw)
    if pack_width:
        units = [(it.seqs[0][:it.prompt_len], [s[it.prompt_len:] for s in it.seqs]) for it in pairs]
        ids, pos, ends, unit, branch = pack_rows(units, pack_width, pad_id)
        for i, (_, responses) in enumerate(units):
            prompt_last = ends[2 * i][1] - len(responses[0])  # the column just before the chosen response
            for k, response in enumerate(responses):
                row, end = ends[2 * i + k]
                add(row, prompt_last, end - len(response) + 1, response)
        mask, position_ids = shared_prefix_mask(t(unit), t(branch)), t(pos)
        real = sum(unit_size(u) for u in units)
    else:
        seqs = [s for it in pairs for s in it.seqs]
        ids, mask = pad_right(seqs, pad_id)
        for n, seq in enumerate(seqs):
            p = pairs[n // 2].prompt_len
            add(n, p - 1, p, seq[p:])
        mask, position_ids = t(mask), None
        real = sum(len(s) for s in seqs)
    index = torch.full((len(spans), max(length for _, length in spans)), len(labels), dtype=torch.long)
    for n, (first, length) in enumerate(spans):
        index[n, :length] = torch.arange(first, first + length)
    return PairBatch(t(ids), mask, position_ids, t(rows), t(columns), t(labels), index.to(device),
                     t([length for _, length in spans]), real)


def sequence_logprobs(model: PreTrainedModel, batch: PairBatch, precision: str) -> torch.Tensor:
    """(2 * pairs,) fp32: log π(response | prompt) of every sequence, summed over its tokens."""
    with autocast(batch.input_ids.device, precision):
        if batch.position_ids is None:  # padded: the model's own forward, its logits read where needed
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False).logits[batch.rows, batch.columns]
        else:  # packed: the trunk under the shared-prefix mask, the LM head on the predicting positions only
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      position_ids=batch.position_ids, use_cache=False).last_hidden_state
            logits = model.get_output_embeddings()(hidden[batch.rows, batch.columns])
    per_token = token_logprobs(logits, batch.labels)  # (tokens,)
    return torch.cat([per_token, per_token.new_zeros(1)])[batch.token_index].sum(1)


class PairScorer(torch.nn.Module):
    """`sequence_logprobs` as one module call, the forward that DistributedDataParallel must see: the
    packed path runs the trunk and the LM head separately, which DDP, wrapping the model, would not."""

    def __init__(self, model: PreTrainedModel, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, batch: PairBatch) -> torch.Tensor:
        return sequence_logprobs(self.model, batch, self.precision)


@torch.no_grad()
def packing_works(model: PreTrainedModel, pad_id: int, device: torch.device) -> bool:
    """Does this architecture give packed pairs exactly the log-probs of padded ones? Checked, not assumed."""
    if model.base_model is model or model.get_output_embeddings() is None:
        return False
    pairs = [EncodedItem([[5, 6, 7, 8, 9], [5, 6, 11, 12]], [0, 1], None, prompt_len=2),
             EncodedItem([[13, 14, 15], [13, 16, 17, 18, 19]], [0, 1], None, prompt_len=1)]
    try:
        packed = sequence_logprobs(model, collate_pairs(pairs, pad_id, device, pack_width=16), "fp32")
    except (TypeError, ValueError, RuntimeError):
        return False
    padded = sequence_logprobs(model, collate_pairs(pairs, pad_id, device), "fp32")
    return torch.allclose(packed, padded, atol=1e-4, rtol=1e-4)


def sequence_ids(pair_ids: list[int]) -> torch.Tensor:
    """Rows of a (2 * pairs,) per-sequence tensor for these pairs, in collate_pairs' order."""
    return torch.tensor([[2 * i, 2 * i + 1] for i in pair_ids]).flatten()


def preference_loss(config: DPOConfig, logps: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor) -> PreferenceLoss:
    """The configured loss over (2 * pairs,) policy and reference sequence log-probs."""
    chosen, rejected = slice(0, None, 2), slice(1, None, 2)
    if config.loss == "ipo":
        return ipo_loss(logps[chosen], logps[rejected], reference[chosen], reference[rejected], config.beta,
                        lengths[chosen], lengths[rejected])
    return dpo_loss(logps[chosen], logps[rejected], reference[chosen], reference[rejected], config.beta,
                    config.label_smoothing)


@dataclass
class Scorer:
    """What a forward over pairs needs besides the model: how to lay them out, in what precision."""

    pad_id: int
    device: torch.device
    pack_width: int
    precision: str
    batch_size: int  # pairs per forward outside training

    def batch(self, pairs: list[EncodedItem]) -> PairBatch:
        return collate_pairs(pairs, self.pad_id, self.device, self.pack_width)

    @torch.no_grad()
    def logprobs(self, model: PreTrainedModel, pairs: list[EncodedItem], dist: Distributed = SINGLE_PROCESS,
                 sharded: PairScorer | None = None) -> torch.Tensor:
        """(2 * len(pairs),) fp32 on the CPU: log π(chosen), log π(rejected) of each pair in turn.
        Under several processes each scores its block of the pairs and every process gets them all.

        `sharded`: the FSDP root to score through once the model is sharded. Each of its calls gathers
        weights from every process, so every process makes as many calls as the one with the most
        batches; a process with fewer scores its first pair again and drops the result."""
        block = dist.shard(len(pairs))
        mine = pairs[block.start:block.stop]
        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if sharded is None:
            out = [sequence_logprobs(model, self.batch(b), self.precision).cpu() for b in batches]
        else:
            calls = max(dist.all_gather(len(batches)))
            out = [sharded(self.batch(b)).cpu() for b in batches]
            for _ in range(calls - len(batches)):
                sharded(self.batch(pairs[:1]))
        return torch.cat(dist.all_gather(torch.cat(out) if out else torch.zeros(0)))


def response_lengths(pairs: list[EncodedItem]) -> torch.Tensor:
    return torch.tensor([len(s) - it.prompt_len for it in pairs for s in it.seqs])


def pair_metrics(terms: PreferenceLoss) -> dict[str, float]:
    """Means over the pairs: loss, reward accuracy and margin, chosen and rejected implicit rewards."""
    n = terms.loss.shape[0]
    return {"loss": float(terms.loss.detach().mean()),
            "reward_accuracy": float(reward_accuracy(terms.chosen_rewards, terms.rejected_rewards)) / n,
            "reward_margin": float((terms.chosen_rewards - terms.rejected_rewards).mean()),
            "reward_chosen": float(terms.chosen_rewards.mean()), "reward_rejected": float(terms.rejected_rewards.mean())}


def evaluate_pairs(config: DPOConfig, model: PreTrainedModel, scorer: Scorer, pairs: list[EncodedItem],
                   reference: torch.Tensor, dist: Distributed = SINGLE_PROCESS,
                   sharded: PairScorer | None = None) -> dict[str, float]:
    """`pair_metrics` of the model on `pairs` (held-out), against their reference log-probs."""
    return pair_metrics(preference_loss(config, scorer.logprobs(model, pairs, dist, sharded), reference,
                                        response_lengths(pairs)))


# -- training ------------------------------------------------------------------------------------------

@dataclass
class TrainingRun:
    """What the loop reports, and what a checkpoint keeps of it."""

    steps: int
    losses: list[float]  # per optimiser step, the mean over its pairs
    accuracies: list[float]
    margins: list[float]
    pairs_seen: int = 0
    real_tokens: int = 0
    pad_tokens: int = 0
    seconds: float = 0.0  # in optimiser steps, held-out evaluations excluded
    eval_seconds: float = 0.0
    held_out: dict[str, float] | None = None  # the last held-out evaluation


def tail_mean(values: list[float], n: int = 20) -> float | None:
    """Mean of the last n values (the end of a run, smoothed over its last steps)."""
    return sum(values[-n:]) / len(values[-n:]) if values else None


def optimise(config: DPOConfig, model: PreTrainedModel, scorer: Scorer, train_pairs: list[EncodedItem],
             held_pairs: list[EncodedItem], reference: dict[str, torch.Tensor], reference_seconds: float,
             state: dict | None, checkpointer: Checkpointer,
             ctx: StageContext) -> tuple[PreTrainedModel, TrainingRun, int, list[int]]:
    """The loop: shuffled micro-batches of pairs, the preference loss, one optimiser step per accumulation.

    Returns the trained fp32 model (under FSDP a fresh, unsharded copy), the run, the step it resumed
    at and the pairs each process trained on. The micro-batches
    are drawn from a generator seeded by the config alone, so a resumed run draws the ones already
    trained on again to put it back. Under several processes every process draws the same global
    micro-batches and trains on its block of each, its loss sum divided by the step's global pair
    count: the processes' gradients add up to the one-process step's (distributed.py).
    """
    dist = ctx.dist
    step_pairs = config.batch_size * config.gradient_accumulation_steps
    total_steps = max(1, math.ceil(len(train_pairs) * config.epochs / step_pairs))
    training = ModelOptimization(model, config.lr, config.weight_decay, scorer.precision, dist,
                                 forward=PairScorer(model, scorer.precision))
    scheduler = warmup_cosine(training.optimizer, max(1, int(config.warmup * total_steps)), total_steps)
    rng = random.Random(config.seed)
    # Padded rows want pairs of similar length together; packed rows want a mix, whose short pairs fill gaps.
    mega = 1 if scorer.pack_width else 32

    def micro_batches() -> Iterator[list[int]]:
        while True:  # epochs, each reshuffled
            yield from length_buckets(train_pairs, config.batch_size, rng, mega)

    batches = micro_batches()
    run, first, local_pairs = TrainingRun(total_steps, [], [], []), 0, 0
    if state is not None:
        training.load_state_dict({**state["models"], "optimizer": state["optimizer"],
                                  "sharding": state.get("sharding", "replicated")}, checkpointer.directory)
        scheduler.load_state_dict(state["scheduler"])
        dist.restore_rng_state(state["rng"], checkpointer.log)
        run, first = TrainingRun(**state["run"]), state["step"]
        for _ in range(first * config.gradient_accumulation_steps):
            local_pairs += len(dist.shard(len(next(batches))))
    logger = ctx.metrics(config.out_dir, config.tensorboard, resume_step=first)
    model.eval()  # dropout off; gradients still flow
    bar = ctx.progress(total=total_steps, initial=first, desc=config.loss)
    for step in range(first, total_steps):
        started = time.perf_counter()
        micro = [next(batches) for _ in range(config.gradient_accumulation_steps)]
        n_pairs = sum(len(ids) for ids in micro)
        lr = scheduler.get_last_lr()[0]
        step_terms: list[PreferenceLoss] = []
        tokens = [0, 0]  # real, padding
        for ids in micro:
            mine = [ids[i] for i in dist.shard(len(ids))]
            # A process left without pairs runs one that counts for nothing: DDP waits for its backward.
            weight, mine = (1.0, mine) if mine else (0.0, ids[:1])
            batch = scorer.batch([train_pairs[i] for i in mine])
            ref = reference["train"][sequence_ids(mine)].to(scorer.device)
            terms = preference_loss(config, training.module(batch), ref, batch.lengths)
            # Summed over the micro-batch, divided by the pairs of the whole step (every process's):
            # accumulation gives the gradient of the mean over all of them, as one batch would.
            dist.backward(terms.loss.sum() * weight / n_pairs)
            training.after_backward()  # bf16: summed in fp32, micro-batch by micro-batch
            if weight:
                step_terms.append(PreferenceLoss(*(t.detach().cpu() for t in terms)))
                tokens = [tokens[0] + batch.real_tokens, tokens[1] + batch.input_ids.numel() - batch.real_tokens]
                local_pairs += len(mine)
        grad_norm = training.step(scheduler, config.grad_clip)
        # The step's metrics are over every process's pairs, so every process logs and guards alike.
        gathered = [t for terms in dist.all_gather(step_terms) for t in terms]
        metrics = pair_metrics(PreferenceLoss(*(torch.cat(parts) for parts in zip(*gathered))))
        real, pad = dist.all_reduce_sum(tokens)
        run.real_tokens, run.pad_tokens = run.real_tokens + int(real), run.pad_tokens + int(pad)
        run.losses.append(metrics["loss"])
        run.accuracies.append(metrics["reward_accuracy"])
        run.margins.append(metrics["reward_margin"])
        run.pairs_seen += n_pairs
        check_finite(config.loss, step + 1, metrics["loss"], grad_norm, checkpointer)
        run.seconds += time.perf_counter() - started
        metrics.update(lr=lr, grad_norm=float(grad_norm))
        last = step + 1 == total_steps
        if held_pairs and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            started = time.perf_counter()
            sharded = training.module if training.sharding == "fsdp" else None
            run.held_out = evaluate_pairs(config, model, scorer, held_pairs, reference["held_out"], dist, sharded)
            run.eval_seconds += time.perf_counter() - started
            metrics.update({f"eval_{k}": v for k, v in run.held_out.items()})
        logger.log(step + 1, metrics)
        bar.update(1)
        if step % 10 == 0 or last:
            bar.set_postfix(loss=f"{tail_mean(run.losses, 10):.3f}", acc=f"{tail_mean(run.accuracies, 10):.2f}")
        if checkpointer.due(step + 1) and not last:
            rngs = dist.rng_states()
            trained = training.state_dict()
            if dist.is_main:
                checkpointer.save({"step": step + 1, "models": {"model": trained["model"]},
                                   "optimizer": trained["optimizer"], "sharding": trained["sharding"],
                                   "scheduler": scheduler.state_dict(),
                                   "rng": rngs, "run": dataclasses.asdict(run), "reference": reference,
                                   "reference_seconds": reference_seconds})
    bar.close()
    logger.close()
    model = training.finish()  # saved in fp32 from here on
    return model, run, first, dist.all_gather(local_pairs)


def fit_dpo(config: DPOConfig, ctx: StageContext) -> dict[str, Any]:
    device, precision = ctx.device_and_precision(config)
    torch.manual_seed(config.seed)
    data, held_data, train_items, held_items = load_splits(config)
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model, device, tokenizer)
    train_pairs, too_long = encode_items(tokenizer, ranked_pairs(train_items), config.max_length)
    held_pairs, held_too_long = encode_items(tokenizer, ranked_pairs(held_items), config.max_length)
    if not train_pairs:
        raise InputError(config.data, f"every pair is longer than max_length={config.max_length} tokens")
    # Checked on the fp32 model, before the optimiser gives it bf16 weights.
    pack_width = config.pack_width if config.pack_width and packing_works(model, tokenizer.pad_token_id, device) else 0
    scorer = Scorer(tokenizer.pad_token_id, device, pack_width, precision, config.eval_batch_size)
    checkpointer = stage_checkpointer(config, ctx)
    state = checkpointer.load(device) if config.resume else None
    if state is not None:
        # On the CPU, where the reference pass keeps them (the checkpoint loads onto the training device).
        reference = {split: logps.cpu() for split, logps in state["reference"].items()}
        reference_seconds = state["reference_seconds"]
    else:  # the model is still the SFT model: its log-probs are the reference's, computed once
        started = time.perf_counter()
        reference = {"train": scorer.logprobs(model, train_pairs, ctx.dist)}
        reference_seconds = time.perf_counter() - started
        reference["held_out"] = scorer.logprobs(model, held_pairs, ctx.dist)
    model, run, resumed_from, pairs_per_process = optimise(config, model, scorer, train_pairs, held_pairs, reference,
                                                    reference_seconds, state, checkpointer, ctx)
    if ctx.dist.is_main:
        save_model_dir(model, tokenizer, config.out_dir)
        checkpointer.remove()
    held = run.held_out or {}
    return {
        "out_dir": str(config.out_dir),
        "loss": config.loss,
        "beta": config.beta,
        "label_smoothing": config.label_smoothing,
        "data": {"train": data.summary(), "held_out_file": held_data.summary() if config.held_out_data else None,
                 "train_pairs": len(train_pairs), "held_out_pairs": len(held_pairs),
                 "dropped_too_long": too_long + held_too_long},
        "steps": run.steps,
        "pairs_per_step": config.batch_size * config.gradient_accumulation_steps,
        "examples_per_process": pairs_per_process,  # training pairs each process trained on, in rank order
        "resumed_from_step": resumed_from,
        "first_train_loss": run.losses[0],
        "final_train_loss": tail_mean(run.losses),
        "first_train_reward_accuracy": run.accuracies[0],
        "final_train_reward_accuracy": tail_mean(run.accuracies),
        "final_train_reward_margin": tail_mean(run.margins),
        "held_out_loss": held.get("loss"),
        "held_out_reward_accuracy": held.get("reward_accuracy"),
        "held_out_reward_margin": held.get("reward_margin"),
        "held_out_reward_chosen": held.get("reward_chosen"),
        "held_out_reward_rejected": held.get("reward_rejected"),
        "packed": bool(pack_width),
        "padding_fraction": run.pad_tokens / max(run.pad_tokens + run.real_tokens, 1),
        "precision": precision,
        "device": str(device),
        "seconds_reference": reference_seconds,
        "seconds_train": run.seconds,
        "seconds_eval": run.eval_seconds,
        # Pairs trained per second of the whole method: the reference pass is DPO's cost too.
        "pairs_per_second": run.pairs_seen / max(reference_seconds + run.seconds, 1e-9),
    }


class DPOStage:
    name = "dpo"
    config_class = DPOConfig
    data_parallel = True

    def outputs(self, config: DPOConfig) -> dict[str, Path]:
        out = Path(config.out_dir)
        return {"model": out, "metrics": out / "metrics.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """From the supervised policy, on the rankings of every round so far, split by prompt as the reward model's."""
        wired: dict[str, Any] = {"model": state.policy_dir(), "out_dir": state.dir / "dpo"}
        if "data" not in user:
            fraction = section_number("dpo", user, "held_out_fraction", float, DPOConfig.held_out_fraction)
            rows = read_jsonl(state.outputs["annotate"]["all_rankings"])
            wired["data"], wired["held_out_data"] = split_rankings(rows, state.dir / "dpo_data", fraction)
        return {**wired, **user, "seed": state.seed(user)}

    def run(self, config: DPOConfig, ctx: StageContext) -> dict[str, Any]:
        return fit_dpo(config, ctx)


STAGE = DPOStage()


def train_dpo(config: DPOConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """DPO (or IPO) from `config.model` on `config.data`; writes a HF directory at `config.out_dir`."""
    return run_stage(STAGE, config, ctx)
