"""Stage 3: train the reward model on preference pairs and rankings.

One loss serves both formats: every item is K responses to one prompt with a
rank each (a pair is K=2), scored in ONE forward pass over all K·batch
sequences, and `kway_ranking_loss` averages its pairwise Bradley–Terry terms.

Where the time goes on a small model, and what we do about it:
- padding: packed rows (below) take shuffled batches, whose mix of lengths packs
  tightly, and are made as narrow as the packing allows; padded batches (models
  that cannot pack) are bucketed by length instead;
- two forward passes per pair (chosen, then rejected, as TRL does): we run one
  over the concatenation, so each batch pays the Python/kernel-launch cost once;
- the prompt computed once per response: packed rows hold each prompt ONCE with
  its K responses after it, each response attending to the prompt and itself
  (a shared-prefix mask), so a pair costs prompt + chosen + rejected tokens,
  not 2 x prompt + chosen + rejected, and scores exactly as two sequences would;
- matmul dtype: bf16 autocast where the `choose_precision` probe measured it faster;
- the whole trunk trained when only its top matters: `train_layers = k` freezes the embeddings
  and the lower layers and runs them once per distinct sequence (`frozen_trunk.py`), so a
  step costs k layers, and a sentence that sits in many pairs is read by the lower trunk once.
Dropout is off (as for the policy in PPO: scores must be deterministic).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint import Checkpointer
from ..config import StageConfig
from ..device import autocast
from ..distributed import SINGLE_PROCESS, Distributed
from ..errors import ConfigError, InputError
from ..generation import MAX_NEW_TOKENS, SamplingSettings, generate
from ..jsonl import read_jsonl, write_jsonl
from ..mixed_precision import MasterWeights
from ..modeling import check_model_dir, load_causal_lm, load_scalar_model, load_tokenizer, max_length_for
from ..progress import progress
from ..prompts import DEFAULT_MAX_LENGTH, encode_prompt, encode_response, pad_right, read_prompts
from ..splits import hash_split, shuffled_split, split_items
from ..stage import RoundState, StageContext, run_stage, section_number, stage_checkpointer
from ..training import ModelOptimization, check_finite, warmup_cosine
from .data import Preference, PreferenceData, read_preferences
from .frozen_trunk import FrozenTrunk
from .losses import kway_ranking_loss, pairwise_accuracy
from .model import RewardModel, init_reward_model

@dataclass
class RewardTrainConfig(StageConfig):
    RENAMED: ClassVar[dict[str, str]] = {"save_every": "checkpoint_every"}

    model: Path = Path("runs/demo/sft")  # backbone: any local HF causal LM directory (and the reference policy)
    data: Path = Path("runs/demo/preferences.jsonl")  # pairs and/or rankings: a file or a directory of them
    held_out_data: Path | None = None  # None: hold out `held_out_fraction` of the prompts of `data`
    held_out_fraction: float = 0.05
    out_dir: Path = Path("runs/demo/reward_model")
    init_from: Path | None = None  # continue training an existing reward-model directory instead of a fresh head
    epochs: float = 1.0
    batch_size: int = 32  # preference items (pairs or rankings) per micro-batch
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3  # right for the embedded 3.7 M-parameter model; ~1e-5 for models of 100 M+ parameters
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the optimiser steps with a linear warm-up; cosine decay after
    grad_clip: float = 1.0
    max_length: int | None = None  # tokens of prompt + response + EOS (None: 192, or the model's context if shorter)
    pack_width: int = 256  # pack a batch's items (prompt once + K responses) into rows this wide (0: pad instead)
    train_layers: int = 0  # > 0: train only the top this many layers (+ final norm, head); the rest run once per text
    checkpoint_every: int = 100  # optimiser steps between checkpoints a killed run resumes from (0: none)
    normalize_prompts: Path | None = None  # prompts to sample reference responses from; None: the data's responses
    normalize_samples: int = 256
    normalize_max_new_tokens: int = MAX_NEW_TOKENS
    eval_batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        check_model_dir(self.model)
        with self.about("max_length"):
            self.max_length = max_length_for(self.model, self.max_length, DEFAULT_MAX_LENGTH, type(self).__name__)
        if self.init_from is not None:
            check_model_dir(self.init_from)
        for path in (self.data, self.held_out_data, self.normalize_prompts):
            if path is not None and not Path(path).exists():
                raise InputError(path, "no such file or directory")
        check_preference_schedule(self)
        self.require(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: no checkpoints)")
        self.require(self.train_layers >= 0, "train_layers must be >= 0 (0 trains every layer)")
        self.require(not self.train_layers or self.pack_width, "train_layers needs packed rows (pack_width > 0)")
        self.require(self.normalize_samples >= 2, "normalize_samples must be >= 2 (a std needs two scores)")


def check_preference_schedule(config: StageConfig) -> None:
    """The checks every stage that trains on preference pairs shares (reward model, DPO)."""
    config.require(config.batch_size >= 1 and config.gradient_accumulation_steps >= 1,
                   "batch_size and gradient_accumulation_steps must be >= 1")
    config.require(config.epochs > 0 and config.lr > 0, "epochs and lr must be positive")
    config.require(0 <= config.warmup < 1, "warmup is a fraction of the optimiser steps, in [0, 1)")
    config.require(0 < config.held_out_fraction < 0.5, "held_out_fraction must be in (0, 0.5)")
    config.require(config.max_length >= 8, "max_length must be >= 8 tokens")
    config.require(config.pack_width >= 0, "pack_width must be >= 0 (0 turns packing off)")


# -- encoding and batching ---------------------------------------------------------------

@dataclass
class EncodedItem:
    seqs: list[list[int]]  # K token sequences: prompt + response + EOS
    ranks: list[int]
    margin: float | None
    prompt_len: int = 0  # every sequence starts with the same prompt_len prompt tokens


def encode_items(tokenizer: PreTrainedTokenizerBase, items: list[Preference], max_length: int) -> tuple[list[EncodedItem], int]:
    """Token ids per item; items with a sequence over max_length are dropped (truncation would cut the EOS we score)."""
    encoded, too_long = [], 0
    prompt_cache: dict[str, list[int]] = {}
    for item in items:
        if item.prompt not in prompt_cache:
            prompt_cache[item.prompt] = encode_prompt(tokenizer, item.prompt)
        p = prompt_cache[item.prompt]
        seqs = [p + encode_response(tokenizer, r) for r in item.responses]
        if max(len(s) for s in seqs) > max_length:
            too_long += 1
            continue
        encoded.append(EncodedItem(seqs, item.ranks, item.margin, len(p)))
    return encoded, too_long


@dataclass
class RMBatch:
    input_ids: torch.Tensor  # (rows, width): padded sequences, or packed rows of several items
    attention_mask: torch.Tensor  # padded: (rows, width), 0 on padding; packed: (rows, 1, width, width) bool
    position_ids: torch.Tensor | None  # (rows, width) as each sequence would see alone; None when padded
    ends: torch.Tensor  # (n_seqs, 2): (row, column) of each sequence's last token, its EOS, where it is scored
    index: torch.Tensor  # (batch, K_max): sequence number of item b's response k (0 on padding slots)
    valid: torch.Tensor  # (batch, K_max): False on padding slots (items with fewer responses)
    ranks: torch.Tensor  # (batch, K_max)
    margin: torch.Tensor | None  # (batch,), None when no item has one
    real_tokens: int

    @property
    def size(self) -> int:
        return self.index.shape[0]


Unit = tuple[list[int], list[list[int]]]  # one item to pack: (prompt ids, [response ids, ...])


def unit_size(unit: Unit) -> int:
    """Tokens the item takes in a packed row: its prompt once, then every response."""
    return len(unit[0]) + sum(len(r) for r in unit[1])


def first_fit_decreasing(sizes: list[int], width: int) -> list[list[int]]:
    """Bin packing: indices of `sizes` per row, longest first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r in range(len(rows)):
            if room[r] >= sizes[i]:
                rows[r].append(i)
                room[r] -= sizes[i]
                break
        else:
            rows.append([i])
            room.append(width - sizes[i])
    return rows


def pack_rows(units: list[Unit], width: int,
              pad_id: int) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]], list[list[int]], list[list[int]]]:
    """First-fit-decreasing packing of items (a prompt and its K responses) into rows of at most
    `width` tokens (wider when one item is longer than that), then the same number of rows made
    as narrow as the packing allows.

    A unit is laid out as prompt, response 1, ..., response K; each response's position ids
    continue from the prompt's, exactly as in the sequence prompt + response alone. Returns
    (ids, position_ids, ends, unit, branch): ends[n] is the (row, column) of the n-th response
    overall (its EOS, where it is scored); unit and branch label every token for
    `shared_prefix_mask` (branch 0 = prompt, k = response k). A row's leftover tail is filler,
    each token a unit of its own that attends only to itself and is read by nobody.
    """
    sizes = [unit_size(u) for u in units]
    width = max(width, *sizes)
    rows = first_fit_decreasing(sizes, width)
    # Balance: keep that many rows but make them as narrow as first-fit still allows. A batch's
    # leftover space then spreads over every row as a few tokens, instead of one half-empty last row.
    for narrower in range(max(max(sizes), -(-sum(sizes) // len(rows))), width):
        candidate = first_fit_decreasing(sizes, narrower)
        if len(candidate) == len(rows):
            rows, width = candidate, narrower
            break
    room = [width - sum(sizes[i] for i in members) for members in rows]
    first_end = [0]
    for _, responses in units:
        first_end.append(first_end[-1] + len(responses))
    shrink = min(room)  # drop the columns that every row leaves empty
    room = [r - shrink for r in room]
    ids, pos, unit, branch, ends = [], [], [], [], [(0, 0)] * first_end[-1]
    filler_unit = len(units)
    for r, members in enumerate(rows):
        row, prow, urow, brow = [], [], [], []
        for i in members:
            prompt, responses = units[i]
            row += prompt
            prow += range(len(prompt))
            urow += [i] * len(prompt)
            brow += [0] * len(prompt)
            for k, resp in enumerate(responses):
                row += resp
                prow += range(len(prompt), len(prompt) + len(resp))
                urow += [i] * len(resp)
                brow += [k + 1] * len(resp)
                ends[first_end[i] + k] = (r, len(row) - 1)
        ids.append(row + [pad_id] * room[r])
        pos.append(prow + [0] * room[r])
        unit.append(urow + list(range(filler_unit, filler_unit + room[r])))
        filler_unit += room[r]
        branch.append(brow + [0] * room[r])
    return ids, pos, ends, unit, branch


def shared_prefix_mask(unit: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(rows, 1, W, W) bool: token i attends to token j when both belong to one item, j is not after i,
    and j is in the prompt or in i's own response: each response sees exactly prompt + itself."""
    same_unit = unit[:, :, None] == unit[:, None, :]
    not_after = torch.ones(unit.shape[1], unit.shape[1], dtype=torch.bool, device=unit.device).tril()
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (same_unit & not_after & visible)[:, None]


def shared_prompt_units(items: list[EncodedItem], width: int) -> tuple[list[Unit], list[list[int]]]:
    """Items that share a prompt, as units of that prompt once and all their responses (each unit at
    most `width` tokens, unless one item alone is wider), and per item, the overall number of each
    of its responses in unit order (what `pack_rows` numbers its `ends` by; 0 on padding slots).

    Preference data often asks one prompt many times (several annotators, a fixed instruction per
    domain): its tokens are then computed once per unit, not once per item.
    """
    k_max = max(len(it.seqs) for it in items)
    units: list[Unit] = []
    open_unit: dict[tuple[int, ...], int] = {}
    placed: list[list[tuple[int, int]]] = []  # per item: (unit, position in the unit) of each response
    for it in items:
        prompt, responses = it.seqs[0][:it.prompt_len], [s[it.prompt_len:] for s in it.seqs]
        u = open_unit.get(tuple(prompt))
        if u is None or unit_size(units[u]) + sum(len(r) for r in responses) > width:
            u = open_unit[tuple(prompt)] = len(units)
            units.append((prompt, []))
        placed.append([(u, len(units[u][1]) + k) for k in range(len(responses))])
        units[u][1].extend(responses)
    first = [0]
    for _, responses in units:
        first.append(first[-1] + len(responses))
    index = [[first[u] + k for u, k in mine] + [0] * (k_max - len(mine)) for mine in placed]
    return units, index


def collate(items: list[EncodedItem], pad_id: int, device: torch.device, pack_width: int = 0) -> RMBatch:
    k_max = max(len(it.seqs) for it in items)
    valid = [[True] * len(it.seqs) + [False] * (k_max - len(it.seqs)) for it in items]
    ranks = [it.ranks + [0] * (k_max - len(it.seqs)) for it in items]
    t = lambda x, **kw: torch.tensor(x, device=device, **kw)
    if pack_width:
        units, index = shared_prompt_units(items, pack_width)
        ids, pos, ends, unit, branch = pack_rows(units, pack_width, pad_id)
        mask, pos = shared_prefix_mask(t(unit), t(branch)), t(pos)
        real = sum(unit_size(u) for u in units)
    else:  # one row per sequence, items' responses in order
        seqs, index = [], []
        for it in items:
            index.append([len(seqs) + i for i in range(len(it.seqs))] + [0] * (k_max - len(it.seqs)))
            seqs += it.seqs
        ids, mask = pad_right(seqs, pad_id)
        mask, pos, ends = t(mask), None, [(i, len(s) - 1) for i, s in enumerate(seqs)]
        real = sum(len(s) for s in seqs)
    margin = None
    if any(it.margin is not None for it in items):
        margin = t([it.margin or 0.0 for it in items])
    return RMBatch(t(ids), mask, pos, t(ends), t(index), t(valid, dtype=torch.bool), t(ranks), margin, real)


def length_buckets(items: list[EncodedItem], batch_size: int, rng: random.Random, mega: int = 32) -> list[list[int]]:
    """Batches of item indices with similar lengths, in random order.

    Shuffle, cut into mega-batches of `mega` batches, sort each by length, cut
    into batches, shuffle the batches: padding nearly as small as a full sort,
    while every epoch still sees different batch compositions. mega=1 is a plain
    shuffle (what packed rows want).
    """
    order = list(range(len(items)))
    rng.shuffle(order)
    cost = lambda i: max(len(s) for s in items[i].seqs)
    batches = []
    for start in range(0, len(order), mega * batch_size):
        chunk = sorted(order[start:start + mega * batch_size], key=cost)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def item_scores(model: PreTrainedModel, batch: RMBatch, precision: str, trunk: FrozenTrunk | None = None) -> torch.Tensor:
    """(batch, K_max) fp32 scores, each response scored once, read at its last token (the EOS).

    With a `trunk`, the batch holds slot ids of its cached lower-trunk states and only the top layers run."""
    with autocast(batch.input_ids.device, precision):
        if batch.position_ids is None:  # padded: the HF head finds the last non-pad token itself
            seq_scores = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
        else:  # packed: run the backbone under the shared-prefix mask, apply the head at each response's end
            if trunk is not None:
                hidden = trunk.hidden(model, batch)
            else:
                hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          position_ids=batch.position_ids, use_cache=False).last_hidden_state
            seq_scores = model.score(hidden[batch.ends[:, 0], batch.ends[:, 1]])[:, 0]
    return seq_scores.float()[batch.index]


class ItemScorer(torch.nn.Module):
    """`item_scores` as one module call, the forward that DistributedDataParallel must see: the packed
    path runs the backbone and the head separately, which DDP, wrapping the model, would not."""

    def __init__(self, model: PreTrainedModel, precision: str, trunk: FrozenTrunk | None = None):
        super().__init__()
        self.model, self.precision, self.trunk = model, precision, trunk

    def forward(self, batch: RMBatch) -> torch.Tensor:
        return item_scores(self.model, batch, self.precision, self.trunk)


def null_item(item: EncodedItem) -> EncodedItem:
    """`item` with every response tied: scored as usual, it gives no comparison, loss 0 and gradient 0."""
    return EncodedItem(item.seqs, [0] * len(item.seqs), None, item.prompt_len)


@torch.no_grad()
def packing_works(model: PreTrainedModel, pad_id: int, device: torch.device) -> bool:
    """Does this architecture score packed sequences exactly as padded ones? Checked, not assumed."""
    if not isinstance(getattr(model, "score", None), torch.nn.Linear) or model.base_model is model:
        return False
    items = [EncodedItem([[5, 6, 7, 8, 9], [5, 6, 11, 12]], [0, 1], None, prompt_len=2),
             EncodedItem([[13, 14], [15, 16, 17, 18]], [1, 0], None)]
    try:
        packed = item_scores(model, collate(items, pad_id, device, pack_width=16), "fp32")
    except (TypeError, ValueError, RuntimeError):
        return False
    padded = item_scores(model, collate(items, pad_id, device), "fp32")
    return torch.allclose(packed, padded, atol=1e-4, rtol=1e-4)


PROBE_ITEMS = [EncodedItem([[5, 6, 7, 8, 9], [5, 6, 11, 12]], [0, 1], None, prompt_len=2),
               EncodedItem([[19, 20, 21, 13, 14], [19, 20, 21, 15, 16, 17], [19, 20, 21, 7]], [1, 0, 2], None,
                           prompt_len=3),
               EncodedItem([[5, 6, 7, 8, 9], [5, 6, 22]], [0, 1], None, prompt_len=2)]  # repeats a sequence


@torch.no_grad()
def check_split_exact(model: PreTrainedModel, train_layers: int, pad_id: int, device: torch.device) -> None:
    """Refuse `train_layers` where the top layers run from cached states do not score what the whole
    model scores (checked in fp32 on three packed items; freezes the lower trunk as training will)."""
    whole = item_scores(model, collate(PROBE_ITEMS, pad_id, device, pack_width=16), "fp32")
    trunk, slotted = FrozenTrunk.build(model, PROBE_ITEMS, train_layers, pad_id, "fp32", batch_size=4)
    split = item_scores(model, collate(slotted, 0, device, pack_width=16), "fp32", trunk)
    if not torch.allclose(whole, split, atol=1e-4, rtol=1e-4):
        raise ConfigError(f"train_layers={train_layers}: this {model.config.model_type} model does not score the same "
                          f"when its top layers start from the lower layers' cached states (it transforms "
                          f"inputs_embeds before its first layer); set train_layers: 0")


def accumulate_gradients(model: PreTrainedModel | torch.nn.Module, micro: list[RMBatch], precision: str,
                         masters: MasterWeights, n_items: int | None = None,
                         dist: Distributed = SINGLE_PROCESS) -> tuple[float, float, float]:
    """Backward over the micro-batches of one optimiser step; returns (loss, correct, compared).

    Each micro-batch's summed item losses are divided by the item count of the
    WHOLE step, so the accumulated gradient is that of the mean over all items,
    exactly as if they had been one batch (dividing by each micro-batch's own
    size would over-weight items in small, e.g. last, micro-batches).
    `model`: the reward model, or its `ItemScorer` (in DDP under several processes);
    `n_items`: the step's items over every process (default: these micro-batches'); the returned
    sums are this process's (`dist` only scales the backward, see `Distributed.backward`).
    """
    score = model if not isinstance(model, PreTrainedModel) else ItemScorer(model, precision)
    n_items = sum(b.size for b in micro) if n_items is None else n_items
    total, correct, compared = 0.0, 0.0, 0.0
    for b in micro:
        scores = score(b)
        loss = kway_ranking_loss(scores, b.ranks, b.valid, b.margin).sum() / n_items
        dist.backward(loss)
        masters.accumulate_grads()  # bf16: summed in fp32, micro-batch by micro-batch, as autocast would
        total += loss.item()
        c, n = pairwise_accuracy(scores.detach(), b.ranks, b.valid)
        correct, compared = correct + float(c), compared + float(n)
    return total, correct, compared


# -- training --------------------------------------------------------------------------------

def split_by_prompt(items: list[Preference], fraction: float, seed: int) -> tuple[list[Preference], list[Preference]]:
    """Hold out whole prompts, so no held-out prompt was seen in training."""
    _, held = shuffled_split(sorted({it.prompt for it in items}), fraction, random.Random(seed))
    return split_items(items, lambda it: it.prompt, held)


def load_backbone(config: RewardTrainConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> PreTrainedModel:
    if config.init_from is not None:
        model = load_scalar_model(config.init_from)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = init_reward_model(config.model, tokenizer)
    return model.to(device)


def fit_normalization(raw: list[float]) -> tuple[float, float]:
    """gain, bias with gain·raw + bias of mean 0 and std 1 over `raw` (the reference policy's responses)."""
    t = torch.tensor(raw, dtype=torch.float64)
    std = float(t.std()) if len(raw) > 1 else 0.0
    gain = 1.0 / max(std, 1e-6)
    return gain, -float(t.mean()) * gain


def reference_responses(config: RewardTrainConfig, tokenizer, device, precision: str,
                        train_items: list[Preference]) -> tuple[list[str], list[str], str]:
    """(prompts, responses, where they came from) for the normalisation."""
    if config.normalize_prompts is not None:
        prompts = read_prompts(Path(config.normalize_prompts), config.normalize_samples)
        policy = load_causal_lm(config.model, device, tokenizer)
        settings = SamplingSettings(max_new_tokens=config.normalize_max_new_tokens, batch_size=64, seed=config.seed)
        completions = generate(policy, tokenizer, prompts, settings, precision)
        return prompts, [c.completion for c in completions], f"{len(prompts)} samples of {config.model}"
    # No prompts given: the training data's responses stand in for the reference
    # policy's (in the demo they ARE samples of the SFT policy).
    pairs = [(it.prompt, r) for it in train_items for r in it.responses]
    random.Random(config.seed).shuffle(pairs)
    pairs = pairs[:config.normalize_samples]
    return [p for p, _ in pairs], [r for _, r in pairs], f"{len(pairs)} responses of the training data"


def split_rankings(rows: list[dict], out_dir: Path, fraction: float) -> tuple[Path, Path]:
    """Rankings of every round so far -> train / held-out files, split by prompt with `hash_split`,
    so a prompt held out in one round stays held out as the data grows."""
    train_prompts, held_prompts = hash_split([r["prompt"] for r in rows], fraction)
    if not train_prompts or not held_prompts:
        raise ConfigError("the reward model needs rankings on at least two prompts (one held out)")
    train, held = split_items(rows, lambda r: r["prompt"], held_prompts)
    paths = out_dir / "train_rankings.jsonl", out_dir / "held_out_rankings.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], held)
    return paths


class RewardStage:
    name = "reward"
    config_class = RewardTrainConfig
    data_parallel = True

    def outputs(self, config: RewardTrainConfig) -> dict[str, Path]:
        return {"model": Path(config.out_dir)}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """Retrained each round from the supervised policy's trunk, on the rankings of every round so far."""
        wired: dict[str, Any] = {"model": state.policy_dir(), "out_dir": state.dir / "reward_model",
                                 "normalize_prompts": state.prompts("ppo", "train_prompts")}
        if state.response_tokens is not None:
            wired["normalize_max_new_tokens"] = state.response_tokens
        if "data" not in user:
            fraction = section_number("reward", user, "held_out_fraction", float, RewardTrainConfig.held_out_fraction)
            rows = read_jsonl(state.outputs["annotate"]["all_rankings"])
            wired["data"], wired["held_out_data"] = split_rankings(rows, state.dir / "reward_data", fraction)
        return {**wired, **user}

    def run(self, config: RewardTrainConfig, ctx: StageContext) -> dict[str, Any]:
        summary = fit_reward_model(config, ctx)
        # Accuracy and calibration figure on prompts it never saw, by rank 0 (which saved the model).
        if config.held_out_data is not None and ctx.dist.is_main:
            from .evaluate import RewardEvalConfig, evaluate_reward_model

            # Its own context, of this one process: the evaluation's time is part of this stage's,
            # not a stage of the run's.
            ev = evaluate_reward_model(RewardEvalConfig(reward_model=config.out_dir, data=config.held_out_data,
                                                        batch_size=config.eval_batch_size, max_length=config.max_length,
                                                        device=config.device, precision=config.precision),
                                       StageContext(dist=SINGLE_PROCESS))
            summary["held_out_eval"] = {k: ev[k] for k in ("items", "comparisons", "accuracy", "loss", "mean_margin",
                                                           "calibration", "agreement", "calibration_png")}
            summary.update(held_out_accuracy=ev["accuracy"], held_out_loss=ev["loss"], held_out_mean_margin=ev["mean_margin"])
            summary["data"].update(held_out_items=ev["items"],
                                   dropped_too_long=summary["data"]["dropped_too_long"] + ev["dropped_too_long"])
        return summary


STAGE = RewardStage()


class GoldRewardStage(RewardStage):
    """A second reward model, trained once in a pipeline on data the policy never trains against
    (e.g. the gold split of the human-sentiment pairs): every round's evaluation is judged by it
    too, the held-out judge that shows where optimising the proxy stops helping (Gao et al. 2023)."""

    name = "gold_reward"

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """Its `data` is the user's (the pipeline checks it is given): no earlier stage's output is the gold data."""
        return {"model": state.policy_dir(), "out_dir": state.out / "gold_reward_model", **user}


GOLD_STAGE = GoldRewardStage()


def train_reward_model(config: RewardTrainConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Train, normalise and save a reward model (and evaluate it on `held_out_data` when given)."""
    return run_stage(STAGE, config, ctx)


def load_splits(config: RewardTrainConfig) -> tuple[PreferenceData, PreferenceData, list[Preference], list[Preference]]:
    """(the data file, the held-out file, train items, held-out items)."""
    data = read_preferences(config.data)
    if config.held_out_data is not None:
        held_data = read_preferences(config.held_out_data)
        train_items, held_items = data.items, held_data.items
    else:
        held_data = PreferenceData()
        train_items, held_items = split_by_prompt(data.items, config.held_out_fraction, config.seed)
    if not data.items:
        raise InputError(config.data, f"no usable preferences ({data.summary()['rejected_by_reason']})")
    if not train_items:  # every usable row's prompt was held out: too few distinct prompts to split
        prompts = len({it.prompt for it in data.items})
        raise InputError(config.data, f"no preferences left to train on: its {len(data.items)} usable row(s) have "
                                      f"{prompts} distinct prompt(s), all held out by held_out_fraction="
                                      f"{config.held_out_fraction}; give more prompts or a held_out_data file")
    return data, held_data, train_items, held_items


@dataclass
class TrainingRun:
    """What the reward model's optimisation loop reports."""

    steps: int
    losses: list[float]
    correct: float
    compared: float
    pad_tokens: int
    real_tokens: int
    items_seen: int  # over every process
    seconds: float
    examples_per_process: list[int] = dataclasses.field(default_factory=list)  # items, in rank order; set at the end


def fit_reward_model(config: RewardTrainConfig, ctx: StageContext) -> dict[str, Any]:
    from .evaluate import preference_metrics

    device, precision = ctx.device_and_precision(config)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    data, held_data, train_items, held_items = load_splits(config)
    tokenizer = load_tokenizer(config.model)
    model = load_backbone(config, tokenizer, device)
    train_enc, too_long = encode_items(tokenizer, train_items, config.max_length)
    if not train_enc:
        raise InputError(config.data, f"every item is longer than max_length={config.max_length} tokens")
    # Checked on the fp32 model, before optimise() gives it bf16 weights.
    pack_width = config.pack_width if config.pack_width and packing_works(model, tokenizer.pad_token_id, device) else 0
    trunk = None
    if config.train_layers:
        if not pack_width:
            raise ConfigError(f"train_layers: this {model.config.model_type} model cannot score packed rows "
                              f"(checked), which the cached lower trunk needs; set train_layers: 0")
        check_split_exact(model, config.train_layers, tokenizer.pad_token_id, device)
        # Every process caches the whole training set (each draws from all of it).
        trunk, train_enc = FrozenTrunk.build(model, train_enc, config.train_layers, tokenizer.pad_token_id,
                                             precision, config.eval_batch_size)
    checkpointer = stage_checkpointer(config, ctx)
    run, model = optimise(config, model, tokenizer, train_enc, pack_width, precision, rng, checkpointer, ctx.dist,
                          trunk)
    model.eval()
    if not ctx.dist.is_main:  # rank 0 normalises, evaluates and saves; run_stage hands its summary to all
        return {"out_dir": str(config.out_dir), "steps": run.steps, "examples_per_process": run.examples_per_process}

    rm = RewardModel(model, tokenizer, precision=precision)
    norm_prompts, norm_responses, norm_source = reference_responses(config, tokenizer, device, precision, train_items)
    rm.gain, rm.bias = fit_normalization(rm.score(norm_prompts, norm_responses, config.eval_batch_size, normalize=False))
    # A held-out file is scored once, by the stage's evaluation after saving; a split of `data` here.
    held_metrics = (preference_metrics(rm, held_items, config.eval_batch_size, config.max_length)
                    if held_items and config.held_out_data is None else None)
    rm.save_pretrained(config.out_dir)
    checkpointer.remove()
    held = held_metrics or {}
    return {
        "out_dir": str(config.out_dir),
        "data": {"train": data.summary(), "held_out_file": held_data.summary() if config.held_out_data else None,
                 "train_items": len(train_enc), "held_out_items": held.get("items", 0),
                 "dropped_too_long": too_long + held.get("dropped_too_long", 0)},
        "steps": run.steps,
        "items_per_step": config.batch_size * config.gradient_accumulation_steps,
        "examples_per_process": run.examples_per_process,  # training items (pairs, rankings), in rank order
        "final_train_loss": sum(run.losses[-20:]) / len(run.losses[-20:]),
        "train_accuracy": run.correct / max(run.compared, 1),
        "padding_fraction": run.pad_tokens / max(run.pad_tokens + run.real_tokens, 1),
        "packed": bool(pack_width),
        "frozen_trunk": trunk.summary() if trunk is not None else None,
        "held_out_accuracy": held.get("accuracy"),
        "held_out_loss": held.get("loss"),
        "held_out_mean_margin": held.get("mean_margin"),
        "normalization": {"gain": rm.gain, "bias": rm.bias, "fitted_on": norm_source},
        "init": str(config.init_from) if config.init_from else f"fresh head on {config.model}",
        "precision": precision,
        "train_seconds": run.seconds,
        "items_per_second": run.items_seen / max(run.seconds, 1e-9),
    }


def optimise(config: RewardTrainConfig, model: PreTrainedModel, tokenizer, train_enc: list[EncodedItem],
             pack_width: int, precision: str, rng: random.Random, checkpointer: Checkpointer,
             dist: Distributed = SINGLE_PROCESS,
             trunk: FrozenTrunk | None = None) -> tuple[TrainingRun, PreTrainedModel]:
    """The optimisation loop: shuffled micro-batches, K-way loss, one optimiser step per accumulation.

    An interrupted run of the same config resumes from its last checkpoint: the micro-batches are
    drawn from `rng` alone, so drawing the ones already trained on again puts the stream back.
    Under several processes (`dist`) every process draws the same global micro-batches and scores
    its block of each; the loss is divided by the step's global item count and the processes'
    gradients add up, so the step is the one-process step up to the order of the float sums.
    With a `trunk`, `train_enc` holds slot ids (`FrozenTrunk.build`) and only its top layers train.
    Returns the run and the trained fp32 model (under FSDP a fresh, unsharded copy).
    """
    device = next(model.parameters()).device
    step_items = config.batch_size * config.gradient_accumulation_steps
    total_steps = max(1, math.ceil(len(train_enc) * config.epochs / step_items))
    # The forward DDP (or FSDP, as its root) sees: the packed path runs the backbone and the head apart.
    training = ModelOptimization(model, config.lr, config.weight_decay, precision, dist,
                                 forward=ItemScorer(model, precision, trunk))
    scheduler = warmup_cosine(training.optimizer, max(1, int(config.warmup * total_steps)), total_steps)
    # Padded batches want items of similar length together; packed rows want a mix, whose short
    # items fill the gaps that long ones leave.
    mega = 1 if pack_width else 32

    def micro_batches() -> Iterator[list[int]]:
        while True:  # epochs, each reshuffled
            yield from length_buckets(train_enc, config.batch_size, rng, mega)

    def local_micro_batch(indices: list[int]) -> tuple[RMBatch, int]:
        """This process's block of a global micro-batch, and how many real items it holds (an empty
        block scores one null item instead, so that every process runs the backward DDP waits for)."""
        mine = [train_enc[indices[i]] for i in dist.shard(len(indices))]
        items = mine or [null_item(train_enc[indices[0]])]
        return collate(items, 0 if trunk is not None else tokenizer.pad_token_id, device, pack_width), len(mine)

    model.eval()  # dropout off (init_reward_model also zeroes it in the config); grads still flow
    batches = micro_batches()
    run = TrainingRun(total_steps, [], 0.0, 0.0, 0, 0, 0, 0.0)
    first, local_items = 0, 0
    if (state := checkpointer.load(device)) is not None:
        training.load_state_dict({**state["models"], "optimizer": state["optimizer"],
                                  "sharding": state.get("sharding", "replicated")}, checkpointer.directory)
        scheduler.load_state_dict(state["scheduler"])
        dist.restore_rng_state(state["rng"], checkpointer.log)
        run, first = TrainingRun(**state["run"]), state["step"]
        for _ in range(first * config.gradient_accumulation_steps):
            local_items += len(dist.shard(len(next(batches))))
    bar = progress(total=total_steps, initial=first, desc="reward", disable=not dist.is_main)
    start = time.time() - run.seconds
    for step in range(first, total_steps):
        global_micro = [next(batches) for _ in range(config.gradient_accumulation_steps)]
        micro, counts = zip(*(local_micro_batch(indices) for indices in global_micro))
        n_items = sum(len(indices) for indices in global_micro)
        step_loss, c, n = accumulate_gradients(training.module, list(micro), precision, training.masters, n_items,
                                               dist)
        real = sum(b.real_tokens for b, k in zip(micro, counts) if k)
        pad = sum(b.input_ids.numel() - b.real_tokens for b, k in zip(micro, counts) if k)
        step_loss, c, n, real, pad = dist.all_reduce_sum([step_loss, c, n, real, pad])
        run.correct, run.compared = run.correct + c, run.compared + n
        run.real_tokens, run.pad_tokens = run.real_tokens + int(real), run.pad_tokens + int(pad)
        run.items_seen += n_items
        local_items += sum(counts)
        grad_norm = training.step(scheduler, config.grad_clip)
        run.losses.append(step_loss)
        check_finite("reward", step + 1, step_loss, grad_norm, checkpointer)
        bar.update(1)
        if step % 10 == 0 or step == total_steps - 1:
            recent = run.losses[-10:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", acc=f"{run.correct / max(run.compared, 1):.3f}",
                            lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if checkpointer.due(step + 1) and step + 1 < total_steps:
            run.seconds = time.time() - start
            rngs = dist.rng_states()
            trained = training.state_dict()  # every process: a collective under FSDP
            if dist.is_main:
                checkpointer.save({"step": step + 1, "models": {"model": trained["model"]},
                                   "optimizer": trained["optimizer"], "sharding": trained["sharding"],
                                   "scheduler": scheduler.state_dict(), "rng": rngs, "run": dataclasses.asdict(run)})
    bar.close()
    run.seconds = time.time() - start
    run.examples_per_process = dist.all_gather(local_items)
    return run, training.finish()  # scored, evaluated and saved in fp32 from here on
