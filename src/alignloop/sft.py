"""Stage 1: supervised fine-tuning on prompt/response pairs, loss on response tokens only.

Works on any local HF causal LM. Pairs come from a JSONL file
(`{"prompt", "response"}`; `completion` is accepted as the response's name,
as in TRL's prompt-completion format) or, for the embedded default, are
derived from the corpus: the first few words of a quotation are the prompt and
the rest is the response, so the model learns to continue a prompt in the
corpus's style and to stop with EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import StageConfig
from .corpus import load_corpus, split_corpus
from .errors import InputError
from .jsonl import read_records, write_jsonl
from .modeling import check_model_dir, load_causal_lm, load_tokenizer, max_length_for, save_model_dir
from .prompts import DEFAULT_MAX_LENGTH, encode_prompt, encode_response, pad_right
from .splits import shuffled_split
from .stage import RoundState, StageContext, run_stage, stage_checkpointer
from .tokenizer import CONTINUATION_TEMPLATE
from .training import IGNORE, LMBatch, eval_batch_size, perplexity, train_lm


@dataclass
class SFTConfig(StageConfig):
    model: Path = Path("runs/demo/base")  # any local HF causal LM directory
    out_dir: Path = Path("runs/demo/sft")
    data: Path | None = None  # JSONL of {"prompt", "response"}; None: derive pairs from the corpus
    held_out_data: Path | None = None  # JSONL for held-out perplexity; None: a split of `data` or the corpus
    corpus: str | None = None  # used when data is None (default: the fortunes corpus)
    max_response_chars: int = 280  # corpus-derived pairs: quotations short enough to finish in ~64 tokens
    prompt_words_min: int = 2
    prompt_words_max: int = 6
    max_length: int | None = None  # prompt + response tokens (None: 192, or the model's context if shorter); longer pairs are dropped and counted
    batch_size: int = 32
    epochs: float = 1.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 30
    grad_clip: float = 1.0
    held_out_fraction: float = 0.05
    checkpoint_every: int = 100  # optimiser steps between checkpoints a killed run resumes from (0: none)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        check_model_dir(self.model)
        with self.about("max_length"):
            self.max_length = max_length_for(self.model, self.max_length, DEFAULT_MAX_LENGTH, type(self).__name__)
        if self.data is not None and not Path(self.data).exists():
            raise InputError(self.data, "no such data file")
        self.require(1 <= self.prompt_words_min <= self.prompt_words_max,
                     "need 1 <= prompt_words_min <= prompt_words_max")
        self.require(self.batch_size >= 1 and self.epochs > 0 and self.lr > 0, "batch_size, epochs and lr must be positive")
        self.require(0 < self.held_out_fraction < 0.5, "held_out_fraction must be in (0, 0.5)")
        self.require(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: no checkpoints)")


def prompt_cuts(words: list[str], min_words: int, max_words: int) -> range:
    """The numbers of leading words a document may be cut after: min..max, at most half its words
    (empty when the document is shorter than 2 * min_words)."""
    return range(min_words, min(max_words, len(words) // 2) + 1) if len(words) >= 2 * min_words else range(0)


def corpus_pairs(docs: list[str], rng: random.Random, min_words: int, max_words: int) -> list[dict]:
    """Split each document after its first k words (k random among `prompt_cuts`)."""
    pairs = []
    for doc in docs:
        words = doc.split(" ")
        cuts = prompt_cuts(words, min_words, max_words)
        if not cuts:
            continue
        k = rng.randint(cuts.start, cuts.stop - 1)
        pairs.append({"prompt": " ".join(words[:k]), "response": " " + " ".join(words[k:])})
    return pairs


def read_pairs(path: Path) -> list[dict]:
    rows = read_records(path, required={"prompt": str})
    pairs = []
    for row in rows:
        response = row.get("response", row.get("completion"))
        if response is None:
            raise InputError(path, "missing (expected 'response' or 'completion')", line=row["_line"], field="response")
        if not isinstance(response, str):
            raise InputError(path, f"expected str, got {type(response).__name__}", line=row["_line"], field="response")
        if not response.strip():
            raise InputError(path, "empty response", line=row["_line"], field="response")
        pairs.append({"prompt": row["prompt"], "response": response})
    if not pairs:
        raise InputError(path, "no prompt/response pairs in the file")
    return pairs


def encode_pairs(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    encoded, dropped = [], 0
    for pair in pairs:
        p, r = encode_prompt(tokenizer, pair["prompt"]), encode_response(tokenizer, pair["response"])
        if len(p) + len(r) > max_length:
            dropped += 1
            continue
        encoded.append((p, r))
    return encoded, dropped


def pair_batches(encoded, batch_size: int, pad_id: int, device, seed: int | None) -> Iterator[LMBatch]:
    """Right-padded batches; labels are -100 on prompt and padding so only the response is learned."""
    order = list(range(len(encoded)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [encoded[j] for j in order[i:i + batch_size]]
        ids, mask = pad_right([p + r for p, r in chunk], pad_id)
        labels = [[IGNORE] * len(p) + r + [IGNORE] * (len(row) - len(p) - len(r)) for (p, r), row in zip(chunk, ids)]
        yield LMBatch(torch.tensor(ids, device=device), torch.tensor(mask, device=device), torch.tensor(labels, device=device))


class SFTStage:
    name = "sft"
    config_class = SFTConfig
    data_parallel = True

    def outputs(self, config: SFTConfig) -> dict[str, Path]:
        out = Path(config.out_dir)
        # The prompts later stages sample (train) and evaluate on (held out).
        return {"model": out, "train_prompts": out / "train_prompts.jsonl",
                "held_out_prompts": out / "held_out_pairs.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        wired: dict[str, Any] = {"out_dir": state.out / "sft"}
        if "pretrain" in state.outputs:
            wired["model"] = state.outputs["pretrain"]["model"]
        return {**wired, **user}

    def run(self, config: SFTConfig, ctx: StageContext) -> dict[str, Any]:
        return fine_tune(config, ctx)


STAGE = SFTStage()


def sft(config: SFTConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Fine-tune `config.model` on prompt/response pairs; writes a HF directory at `config.out_dir`."""
    return run_stage(STAGE, config, ctx)


def split_pairs(config: SFTConfig, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt/response pairs, from the data files or cut from the corpus."""
    if config.data is not None:
        pairs = read_pairs(Path(config.data))
        if config.held_out_data is not None:
            train_pairs, held_pairs = pairs, read_pairs(Path(config.held_out_data))
        else:
            train_pairs, held_pairs = shuffled_split(pairs, config.held_out_fraction, rng)
    else:
        # Same split as pretraining (same seed and fraction), so held-out quotations stay unseen.
        train_docs, held_docs = split_corpus(load_corpus(config.corpus), config.held_out_fraction, config.seed)
        keep = lambda docs: [d for d in docs if len(d) <= config.max_response_chars]
        train_pairs = corpus_pairs(keep(train_docs), rng, config.prompt_words_min, config.prompt_words_max)
        held_pairs = corpus_pairs(keep(held_docs), rng, config.prompt_words_min, config.prompt_words_max)
    return train_pairs, held_pairs


def fine_tune(config: SFTConfig, ctx: StageContext) -> dict[str, Any]:
    device, precision = ctx.device_and_precision(config)
    train_pairs, held_pairs = split_pairs(config, random.Random(config.seed))
    tokenizer = load_tokenizer(config.model)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CONTINUATION_TEMPLATE  # stored with the model from now on
    model = load_causal_lm(config.model, device, tokenizer)
    train_enc, dropped_train = encode_pairs(tokenizer, train_pairs, config.max_length)
    held_enc, dropped_held = encode_pairs(tokenizer, held_pairs, config.max_length)
    if not train_enc:
        raise InputError(config.data or "corpus", f"every pair is longer than max_length={config.max_length} tokens")
    held_batches = list(pair_batches(held_enc, eval_batch_size(config.batch_size, ctx.dist), tokenizer.pad_token_id, device, None))
    held_ppl_before = perplexity(model, held_batches, precision, ctx.dist)

    steps_per_epoch = -(-len(train_enc) // config.batch_size)
    total_steps = max(1, int(steps_per_epoch * config.epochs))

    def batches() -> Iterator[LMBatch]:
        # Global batches, built on the CPU: train_lm moves each process's rows to its device.
        epoch = 0
        while True:
            yield from pair_batches(train_enc, config.batch_size, tokenizer.pad_token_id, "cpu", config.seed + epoch)
            epoch += 1

    checkpointer = stage_checkpointer(config, ctx)
    run = train_lm(model, batches(), total_steps, config.lr, config.weight_decay, config.warmup_steps,
                   config.grad_clip, precision, desc="sft", checkpointer=checkpointer, dist=ctx.dist)
    model = run.model  # under FSDP a fresh, unsharded copy of the trained weights
    held_ppl_after = perplexity(model, held_batches, precision, ctx.dist)

    out = Path(config.out_dir)
    if ctx.dist.is_main:
        save_model_dir(model, tokenizer, out)
        checkpointer.remove()
        outputs = STAGE.outputs(config)
        write_jsonl(outputs["held_out_prompts"], held_pairs)
        write_jsonl(outputs["train_prompts"], ({"prompt": p["prompt"]} for p in train_pairs))
    return {
        "out_dir": str(out),
        "pairs": {"train": len(train_enc), "held_out": len(held_enc),
                  "dropped_too_long": dropped_train + dropped_held},
        "steps": total_steps,
        "examples_per_process": run.examples_per_process,  # training pairs, in rank order
        "final_train_loss": sum(run.losses[-20:]) / len(run.losses[-20:]),
        "train_seconds": run.seconds,
        "train_tokens_per_second": run.tokens_per_second,
        "held_out_response_perplexity": {"before_sft": held_ppl_before, "after_sft": held_ppl_after},
        "precision": precision,
    }
