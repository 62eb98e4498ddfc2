"""The TRL 0.23 side of `ppo_vs_trl.py`. Runs inside `.venv-trl` (see setup_trl_env.sh), never imports alignloop.

It sees only what a TRL user would have: a policy (causal LM) directory, a reward model and a
value model directory (sequence classifiers), and the prompts as token ids (computed by the
parent with alignloop's prompt formatting, so both sides start from identical tokens).

Usage: .venv-trl/bin/python benchmarks/_trl_ppo_worker.py SPEC.json RESULT.json

Timing: a callback stamps `time.perf_counter()` at the end of every PPO update (TRL's
`on_step_end`); episodes/s = batch_size * timed_steps / (last stamp - stamp after the warm-up
steps). So model loading, `PPOTrainer.__init__` and the warm-up updates are excluded, and everything
TRL does inside an update (generation, scoring, the PPO epochs, its logging, gc.collect) is included.

Workarounds needed to run TRL 0.23 here, kept minimal:
- the tokenizer is loaded as `PreTrainedTokenizerFast` (transformers 5 writes
  `"tokenizer_class": "TokenizersBackend"`, which transformers 4.56's AutoTokenizer does not know;
  the tokenizer.json inside is the same);
- the tokenizer pads on the left (PPOTrainer generates from a batch of left-padded queries; the
  default right padding would put pad tokens between prompt and response);
- the reward model's `reward_normalization.json` (gain, bias), if any, is folded into its `score`
  head (a Linear with a bias), so TRL optimises the same normalised reward as alignloop;

Instrumentation, a few perf_counter calls per step:
- `batch_generation`, `forward` and `get_reward` (as imported by trl.trainer.ppo_trainer) are
  wrapped to split the step time into generation / no-grad scoring / the rest (PPO epochs);
- `get_reward` also records the reward model's raw scores (TRL logs only the scores after its
  missing-EOS penalty); it only copies a (batch,) tensor.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                          TrainerCallback)

import trl
import trl.trainer.ppo_trainer as trl_ppo
from trl import PPOConfig, PPOTrainer


# Seconds spent in TRL's generation and in its no-grad scoring forwards (reference, value, reward),
# accumulated by thin wrappers around the functions ppo_trainer.py calls; the rest of a step is the
# PPO epochs plus TRL's bookkeeping.
PHASES = {"generation": 0.0, "scoring": 0.0}


def timed(fn, phase_of):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        phase = phase_of()
        if phase is not None:
            PHASES[phase] += time.perf_counter() - start
        return out
    return wrapper


class Clock(TrainerCallback):
    """perf_counter at the end of every PPO update, the phase totals then, and every logged metrics dict."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.phases: list[dict] = []
        self.logs: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())
        self.phases.append(dict(PHASES))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "objective/scores" in logs:
            self.logs.append(dict(logs))


def load_reward_like(path: str, attention: str) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                               attn_implementation=attention)
    norm_file = Path(path) / "reward_normalization.json"
    if norm_file.is_file():
        norm = json.loads(norm_file.read_text())
        old = model.score
        head = torch.nn.Linear(old.in_features, 1, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight * norm["gain"])
            head.bias.fill_(norm["bias"])
        model.score = head
    return model


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])

    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["policy"])
    tokenizer.padding_side = "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id

    attention = spec.get("attn_implementation", "sdpa")  # HF's default; "eager" where it is faster
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32, attn_implementation=attention)
    peft_config = None
    if spec.get("lora_r", 0) > 0:
        # TRL's LoRA path: adapters on the policy, the reference = the policy with adapters off (ref_model=None).
        from peft import LoraConfig
        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        ref_policy = None
    else:
        ref_policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32,
                                                          attn_implementation=attention)
    reward_model = load_reward_like(spec["reward_model"], attention)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["value_model"], num_labels=1,
                                                                     dtype=torch.float32, attn_implementation=attention)
    for m in (policy, ref_policy, reward_model, value_model):
        if m is not None:
            m.config.pad_token_id = tokenizer.pad_token_id

    raw_scores: list[list[float]] = []  # per update: the RM's scores of the batch, before TRL's EOS penalty
    original_get_reward = trl_ppo.get_reward

    def recording_get_reward(model, query_responses, pad_token_id, context_length):
        out = original_get_reward(model, query_responses, pad_token_id, context_length)
        if model is reward_model:
            raw_scores.append(out[1].detach().float().tolist())
        return out

    no_grad_scoring = lambda: None if torch.is_grad_enabled() else "scoring"  # noqa: E731
    trl_ppo.get_reward = timed(recording_get_reward, no_grad_scoring)
    trl_ppo.forward = timed(trl_ppo.forward, no_grad_scoring)  # also the update's forward: not counted there
    trl_ppo.batch_generation = timed(trl_ppo.batch_generation, lambda: "generation")

    batch = spec["batch_size"]
    total_steps = spec["warmup_steps"] + spec["steps"]
    dataset = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    args = PPOConfig(
        output_dir=spec["output_dir"],
        report_to="none",
        use_cpu=True,
        bf16=spec["bf16"],
        seed=spec["seed"],
        learning_rate=spec["lr"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=spec["num_mini_batches"],
        num_ppo_epochs=spec["ppo_epochs"],
        local_rollout_forward_batch_size=batch,  # the whole batch in one generate / one forward
        total_episodes=batch * total_steps,
        response_length=spec["response_length"],
        temperature=spec["temperature"],
        kl_coef=spec["kl_coef"],
        stop_token="eos",
        missing_eos_penalty=spec["missing_eos_penalty"],
        num_sample_generations=0,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = Clock()
    setup_start = time.perf_counter()
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        eval_dataset=dataset.select(range(min(batch, len(dataset)))),
        callbacks=[clock],
        peft_config=peft_config,
    )
    train_start = time.perf_counter()
    trainer.train()
    train_end = time.perf_counter()

    warm = spec["warmup_steps"]
    stamps = clock.stamps
    assert len(stamps) == total_steps, f"expected {total_steps} updates, TRL ran {len(stamps)}"
    t0 = stamps[warm - 1] if warm > 0 else train_start
    timed_seconds = stamps[-1] - t0
    step_seconds = [b - a for a, b in zip([train_start] + stamps[:-1], stamps)]
    p0 = clock.phases[warm - 1] if warm > 0 else {"generation": 0.0, "scoring": 0.0}
    split = {k: clock.phases[-1][k] - p0[k] for k in ("generation", "scoring")}
    split["update"] = timed_seconds - split["generation"] - split["scoring"]  # PPO epochs + bookkeeping
    last = spec["final_score_steps"]
    final_raw = [s for step in raw_scores[-last:] for s in step]
    final_logged = [log["objective/scores"] for log in clock.logs[-last:]]
    result = {
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16": spec["bf16"],
        "lora_r": spec.get("lora_r", 0),
        "accelerate_mixed_precision": trainer.accelerator.mixed_precision,  # what bf16=True turned into
        "steps_timed": spec["steps"],
        "warmup_steps_excluded": warm,
        "episodes_timed": batch * spec["steps"],
        "seconds_timed": timed_seconds,
        "episodes_per_second": batch * spec["steps"] / timed_seconds,
        "time_split_seconds": split,  # over the timed steps
        "seconds_setup": train_start - setup_start,
        "seconds_train_total": train_end - train_start,
        "step_seconds": step_seconds,
        "trl_logged_eps_last": clock.logs[-1].get("eps") if clock.logs else None,
        # RM score (normalised, before the missing-EOS penalty) of the last `final_score_steps` batches
        "final_score_mean": sum(final_raw) / len(final_raw),
        # what TRL logs as objective/scores: the same, minus missing_eos_penalty where no EOS was emitted
        "final_penalised_score_mean": sum(final_logged) / len(final_logged),
        "score_per_step": [sum(s) / len(s) for s in raw_scores],
        "kl_per_step": [log["objective/kl"] for log in clock.logs],
        "eos_tokens_per_step": [log["val/num_eos_tokens"] for log in clock.logs],
        "clipfrac_per_step": [log["policy/clipfrac_avg"] for log in clock.logs],
        "approxkl_per_step": [log["policy/approxkl_avg"] for log in clock.logs],
    }
    Path(result_path).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
