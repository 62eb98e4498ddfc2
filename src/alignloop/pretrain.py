"""Stage 0: the embedded default base model, trained here so the toolkit needs no hub.

Trains a byte-level BPE tokenizer and a small GPT-2 on a real corpus (Debian's
fortunes by default, or any .txt/.jsonl the user points at), then writes both
as one standard HF directory and reports held-out perplexity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from .config import StageConfig
from .corpus import load_corpus, split_corpus
from .modeling import build_causal_lm, count_matmul_params, save_model_dir
from .tokenizer import train_tokenizer
from .stage import RoundState, StageContext, run_stage, stage_checkpointer
from .training import LMBatch, eval_batch_size, perplexity, train_lm


# Caps of a model pretrained here, far above the default one's (about 5 M parameters, 4 k tokens a step).
MAX_PARAMETERS = 10**10
MAX_BATCH_TOKENS = 2**24


def gpt2_parameters(vocab_size: int, n_layer: int, n_embd: int, block_size: int) -> int:
    """About how many parameters `build_causal_lm` makes: 12 d^2 per block, token and position embeddings."""
    return 12 * n_layer * n_embd**2 + (vocab_size + block_size) * n_embd


@dataclass
class PretrainConfig(StageConfig):
    out_dir: Path = Path("runs/demo/base")
    corpus: str | None = None  # None: the fortunes directory
    # Large enough to keep most sentiment words whole: split into pieces that also occur inside
    # other words, they leave a reward model on this backbone near a bag of those pieces (docs/reward.md).
    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    block_size: int = 128  # tokens per packed training sequence
    batch_size: int = 32
    epochs: float = 3.0
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    held_out_fraction: float = 0.05
    checkpoint_every: int = 100  # optimiser steps between checkpoints a killed run resumes from (0: none)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    LIMITS: ClassVar[dict] = {"vocab_size": (None, 1_048_576), "n_layer": (None, 1024), "n_embd": (None, 65_536),
                              "n_head": (None, 1024)}

    def validate(self) -> None:
        self.require(self.vocab_size >= 300, "vocab_size must be >= 300 (256 bytes + special tokens + merges)")
        self.require(self.n_layer >= 1 and self.n_embd >= 1 and self.n_head >= 1,
                     "n_layer, n_embd and n_head must be >= 1")
        self.require(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self.require(self.block_size >= 8, "block_size must be >= 8")
        self.require(self.batch_size >= 1 and self.epochs > 0, "batch_size and epochs must be positive")
        self.require(0 < self.held_out_fraction < 0.5, "held_out_fraction must be in (0, 0.5)")
        self.require(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: no checkpoints)")
        # Each size can be within its cap and the model still too big to build: refuse it before it is.
        params = gpt2_parameters(self.vocab_size, self.n_layer, self.n_embd, self.block_size)
        self.require(params <= MAX_PARAMETERS, f"a model of n_layer={self.n_layer}, n_embd={self.n_embd} and "
                     f"vocab_size={self.vocab_size} has {params:.2g} parameters; at most {MAX_PARAMETERS:.0e} is allowed "
                     f"(its weights and optimiser state alone would need {16 * params / 2**30:,.0f} GiB)")
        tokens = self.batch_size * self.block_size
        self.require(tokens <= MAX_BATCH_TOKENS, f"batch_size x block_size = {tokens:,} tokens per step; at most "
                     f"{MAX_BATCH_TOKENS:,} is allowed")



def pack_documents(token_lists: list[list[int]], block_size: int) -> torch.Tensor:
    """Concatenate `<bos> doc <eos>` streams and cut into (n_blocks, block_size); the tail is dropped."""
    stream = [t for ids in token_lists for t in ids]
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size]).view(n_blocks, block_size)


def block_batches(blocks: torch.Tensor, batch_size: int, device: torch.device, shuffle_seed: int | None) -> Iterator[LMBatch]:
    order = list(range(len(blocks)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        ids = blocks[order[i:i + batch_size]].to(device)
        yield LMBatch(ids, torch.ones_like(ids), ids)


class PretrainStage:
    name = "pretrain"
    config_class = PretrainConfig
    data_parallel = True

    def outputs(self, config: PretrainConfig) -> dict[str, Path]:
        return {"model": Path(config.out_dir)}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        return {"out_dir": state.out / "base", **user}

    def run(self, config: PretrainConfig, ctx: StageContext) -> dict[str, Any]:
        return train_base_model(config, ctx)


STAGE = PretrainStage()


def pretrain(config: PretrainConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Train the tokenizer and base model; writes a HF directory at `config.out_dir`; returns the summary."""
    return run_stage(STAGE, config, ctx)


def train_base_model(config: PretrainConfig, ctx: StageContext) -> dict[str, Any]:
    device, precision = ctx.device_and_precision(config)
    docs = load_corpus(config.corpus)
    train_docs, held_docs = split_corpus(docs, config.held_out_fraction, config.seed)

    # One process trains the tokenizer and hands it to the others, so all encode alike.
    tokenizer = ctx.dist.broadcast(train_tokenizer(train_docs, config.vocab_size) if ctx.dist.is_main else None)
    encode = lambda d: [tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    train_blocks = pack_documents([encode(d) for d in train_docs], config.block_size)
    held_blocks = pack_documents([encode(d) for d in held_docs], config.block_size)

    model = build_causal_lm(tokenizer, config.n_layer, config.n_embd, config.n_head,
                            n_positions=max(256, config.block_size), seed=config.seed).to(device)
    steps_per_epoch = -(-len(train_blocks) // config.batch_size)
    total_steps = max(1, int(steps_per_epoch * config.epochs))

    def batches() -> Iterator[LMBatch]:
        # Global batches on the CPU (train_lm moves each process's rows); reshuffled each epoch,
        # train_lm stops at total_steps.
        epoch = 0
        while True:
            yield from block_batches(train_blocks, config.batch_size, torch.device("cpu"), config.seed + epoch)
            epoch += 1

    held_batches = list(block_batches(held_blocks, eval_batch_size(config.batch_size, ctx.dist), device, None))
    checkpointer = stage_checkpointer(config, ctx)
    run = train_lm(model, batches(), total_steps, config.lr, config.weight_decay, config.warmup_steps,
                   config.grad_clip, precision, desc="pretrain", checkpointer=checkpointer, dist=ctx.dist)
    model = run.model  # under FSDP a fresh, unsharded copy of the trained weights
    held_ppl = perplexity(model, held_batches, precision, ctx.dist)

    if ctx.dist.is_main:
        save_model_dir(model, tokenizer, config.out_dir)
        checkpointer.remove()
    return {
        "out_dir": str(config.out_dir),
        "documents": {"train": len(train_docs), "held_out": len(held_docs)},
        "tokens": {"train": int(train_blocks.numel()), "held_out": int(held_blocks.numel())},
        "parameters": sum(p.numel() for p in model.parameters()),
        "matmul_parameters": count_matmul_params(model),
        "steps": total_steps,
        "examples_per_process": run.examples_per_process,  # training blocks, in rank order
        "final_train_loss": sum(run.losses[-20:]) / len(run.losses[-20:]),
        "train_seconds": run.seconds,
        "train_tokens_per_second": run.tokens_per_second,
        "held_out_perplexity": held_ppl,
        "precision": precision,
        "device": str(device),
    }
