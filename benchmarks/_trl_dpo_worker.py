"""The TRL 1.16 side of `dpo_vs_trl.py`. Runs inside `.venv-trl116`, never imports alignloop.

It sees what a TRL user has: the SFT model directory and the preference pairs, here as token
ids (`prompt_ids`, `chosen_ids`, `rejected_ids`: the columns `DPOTrainer` makes from text),
computed by the parent with alignloop's prompt formatting, so both sides train on identical
token sequences (prompt + response + EOS). `_prepare_dataset` is skipped to keep those ids:
TRL would tokenize prompt + response together, and BPE merges across the boundary could give
other ids than the prompt and the response tokenized apart (alignloop's, and the sampler's).

Usage: .venv-trl116/bin/python benchmarks/_trl_dpo_worker.py SPEC.json RESULT.json

Timing: with `precompute_ref_log_probs` the reference pass runs inside `DPOTrainer.__init__`
(`_precompute_ref_logps`, timed on its own); a callback stamps `time.perf_counter()` at the
start of training and at the end of every optimiser step. Seconds = reference pass + (last
stamp - first stamp): model loading and the rest of `__init__` are excluded, everything TRL
does in its loop (collation, forwards, its metrics, logging) is included. Without
precompute, the reference forward is part of every step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from _trl_clock import Clock  # beside this script, which is on sys.path


class PreTokenizedDPOTrainer(DPOTrainer):
    """`DPOTrainer` on a dataset that already holds its `prompt_ids` / `chosen_ids` / `rejected_ids`."""

    reference_seconds = 0.0

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        start = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        self.reference_seconds += time.perf_counter() - start
        return out


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    pairs = json.loads(Path(spec["data"]).read_text())

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                 attn_implementation=spec.get("attn_implementation", "sdpa"))
    model.config.pad_token_id = tokenizer.pad_token_id

    train = Dataset.from_dict({key: [p[key] for p in pairs] for key in ("prompt_ids", "chosen_ids", "rejected_ids")})
    args = DPOConfig(
        output_dir=spec["output_dir"],
        report_to="none",
        use_cpu=True,
        bf16=spec["bf16"],
        seed=spec["seed"],
        beta=spec["beta"],
        loss_type=["sigmoid" if spec["loss"] == "dpo" else "ipo"],
        precompute_ref_log_probs=spec["precompute_ref_log_probs"],
        precompute_ref_batch_size=spec["reference_batch_size"],
        learning_rate=spec["lr"],
        # alignloop's schedule: linear warm-up over the same steps, cosine decay to 10 % of the peak.
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=spec["warmup_steps"],
        adam_beta1=0.9,
        adam_beta2=0.95,  # alignloop's AdamW betas
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=spec["epochs"],
        max_length=spec["max_length"],
        # TRL's DPO default is on; it recomputes every forward in the backward (memory for time).
        gradient_checkpointing=spec["gradient_checkpointing"],
        disable_dropout=True,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,  # per-step losses, for the same final-loss average as alignloop's
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = Clock()
    trainer = PreTokenizedDPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=train,
                                     callbacks=[clock])
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    seconds = trainer.reference_seconds + (clock.stamps[-1] - clock.start)
    result = {
        "trainer": "trl",
        "trl_version": __import__("trl").__version__,
        "bf16": spec["bf16"],
        "precompute_ref_log_probs": spec["precompute_ref_log_probs"],
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "attn_implementation": spec.get("attn_implementation", "sdpa"),
        "steps": len(clock.stamps),
        "pairs": min(len(pairs) * spec["epochs"], len(clock.stamps) * spec["batch_size"]),
        "seconds_reference": trainer.reference_seconds,
        "seconds_train": clock.stamps[-1] - clock.start,
        "seconds": seconds,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "losses": losses,
    }
    result["pairs_per_second"] = result["pairs"] / seconds
    Path(result_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
