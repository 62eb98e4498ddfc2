"""The TRL 0.23 side of `reward_vs_trl.py`. Runs inside `.venv-trl`, never imports alignloop.

It sees what a TRL user has: the backbone (causal LM) directory and the preference pairs as
TRL's pre-tokenized columns (input_ids_chosen / attention_mask_chosen / input_ids_rejected /
attention_mask_rejected), computed by the parent with alignloop's prompt formatting, so both
sides train on identical token sequences (prompt + response + EOS). `RewardTrainer` skips its own
tokenization when these columns are present.

Usage: .venv-trl/bin/python benchmarks/_trl_reward_worker.py SPEC.json RESULT.json

Timing: a callback stamps `time.perf_counter()` at the start of training and at the end of every
optimiser step; pairs/s = pairs trained / (last stamp - first stamp). Model loading and
`RewardTrainer.__init__` are excluded; everything TRL does in its loop (collation, two forward
passes per pair, logging) is included. Held-out accuracy: share of held-out pairs whose chosen
sequence scores higher, computed here on the same token ids the parent evaluates alignloop on.

Workaround needed to run TRL 0.23 here: the tokenizer is loaded as `PreTrainedTokenizerFast`
(transformers 5 writes `"tokenizer_class": "TokenizersBackend"`, unknown to transformers 4.56).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast
from trl import RewardConfig, RewardTrainer

from _trl_clock import Clock  # beside this script, which is on sys.path


def columns(pairs: list[dict]) -> dict[str, list]:
    out = {"input_ids_chosen": [p["chosen"] for p in pairs], "input_ids_rejected": [p["rejected"] for p in pairs]}
    out["attention_mask_chosen"] = [[1] * len(x) for x in out["input_ids_chosen"]]
    out["attention_mask_rejected"] = [[1] * len(x) for x in out["input_ids_rejected"]]
    # Read by the length-grouped sampler when group_by_length is on; the collator ignores it.
    out["length"] = [max(len(c), len(r)) for c, r in zip(out["input_ids_chosen"], out["input_ids_rejected"])]
    return out


@torch.no_grad()
def held_out_accuracy(model, pairs: list[dict], pad_id: int, bf16: bool, batch: int = 64) -> float:
    model.eval()
    correct = 0.0

    def scores(seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()

    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        diff = scores([p["chosen"] for p in chunk]) - scores([p["rejected"] for p in chunk])
        correct += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
    return correct / len(pairs)


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    data = json.loads(Path(spec["data"]).read_text())

    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["model"])
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"], num_labels=1, dtype=torch.float32,
        attn_implementation=spec.get("attn_implementation", "sdpa"))  # HF's default; "eager" where faster
    model.config.pad_token_id = tokenizer.pad_token_id

    train = Dataset.from_dict(columns(data["train"]))
    args = RewardConfig(
        output_dir=spec["output_dir"],
        report_to="none",
        use_cpu=True,
        bf16=spec["bf16"],
        seed=spec["seed"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_ratio=spec["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=spec["epochs"],
        max_length=spec["max_length"],
        group_by_length=spec["group_by_length"],
        length_column_name="length",
        disable_dropout=True,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    clock = Clock()
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=train,
                            callbacks=[clock])
    trainer.train()
    seconds = clock.stamps[-1] - clock.start
    pairs_trained = min(len(data["train"]), len(clock.stamps) * spec["batch_size"])
    result = {
        "trainer": "trl",
        "trl_version": __import__("trl").__version__,
        "bf16": spec["bf16"],
        "group_by_length": spec["group_by_length"],
        "attn_implementation": spec.get("attn_implementation", "sdpa"),
        "steps": len(clock.stamps),
        "pairs": len(data["train"]) * spec["epochs"] if spec["epochs"] >= 1 else pairs_trained,
        "train_seconds": seconds,
        "held_out_accuracy": held_out_accuracy(model, data["held_out"], tokenizer.pad_token_id, spec["bf16"]),
    }
    result["pairs_per_second"] = result["pairs"] / seconds
    Path(result_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
