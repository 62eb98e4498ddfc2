"""What the TRL 1.16 GRPO and RLOO workers share. Runs inside `.venv-trl116` (setup_trl116_env.sh), never imports alignloop.

A worker sees only what a TRL user would have: a policy (causal LM) directory, the reward model
directory, and the prompts, as text (a one-turn conversation: TRL applies the model's chat
template) and as the token ids alignloop's prompt formatting gives them; the worker checks that
TRL's tokens are the same before it trains.

The reward function: alignloop's reward model scores `prompt + response` at the response's last
token (the EOS where one was emitted) and applies the gain and bias of `reward_normalization.json`
(scores ~ N(0, 1) under the SFT policy). TRL's own path for a sequence-classification reward model
decodes the completions (special tokens stripped) and re-tokenises them through the chat template,
which appends an EOS to every response, a truncated one too; nor need re-tokenised text give the
generated tokens back. That would be a different number from the one alignloop optimises, so the
reward is a plain Python function, which TRL accepts, scoring the token ids TRL generated
(`completion_ids`) with the same model and the same normalisation. It runs under bf16 autocast when TRL does (bf16=True), as TRL's
own reward-model path would.

Timing: a callback stamps `time.perf_counter()` at the end of every optimiser step (TRL's
`on_step_end`; with steps_per_generation = gradient_accumulation_steps = num_iterations = 1 each
step is one generation batch and one update); episodes/s = batch_size * timed_steps / (last stamp -
stamp after the warm-up steps). Model loading, the trainer's __init__ and the warm-up steps are
excluded; everything TRL does in a step (generation, scoring, the update, its logging) is included.
The trainer's `_generate_single_turn` and `_generate_and_score_completions` are wrapped to split
a step into generation / scoring (reference and old log-probs, the reward) / the rest (the update).

TRL settings chosen for speed where they change nothing the benchmark compares:
`gradient_checkpointing=False` (TRL 1.x defaults it to True: ~20 % slower, for memory this model
does not need), `disable_dropout=True` (our models have none; alignloop also turns it off),
`save_strategy="no"`, no completion logging, no tqdm.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

import trl

PHASES = ("generation", "scoring")


class Clock(TrainerCallback):
    """perf_counter at the end of every optimiser step, the phase totals then, and every logged metrics dict."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phase_totals = phases
        self.stamps: list[float] = []
        self.phases: list[dict] = []
        self.logs: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())
        self.phases.append(dict(self.phase_totals))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "reward" in logs:
            self.logs.append(dict(logs))


class RewardModelScore:
    """TRL reward function: the RM's normalised score of prompt ids + generated ids, at the last token.

    Records every call's raw scores (normalised, before any missing-EOS penalty) for the final
    reward, and returns what the policy is paid: the score minus `missing_eos_penalty` for a
    response that ended without EOS (when a penalty is set).
    """

    __name__ = "reward_model"  # TRL names the reward function's metrics after it

    def __init__(self, path: str, prompt_ids: dict[str, list[int]], eos_id: int, pad_id: int, bf16: bool,
                 missing_eos_penalty: float | None, attention: str) -> None:
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, attn_implementation=attention).eval().requires_grad_(False)
        self.model.config.pad_token_id = pad_id  # the head reads the last non-pad token
        norm_file = Path(path) / "reward_normalization.json"
        norm = json.loads(norm_file.read_text()) if norm_file.is_file() else {"gain": 1.0, "bias": 0.0}
        self.gain, self.bias = float(norm["gain"]), float(norm["bias"])
        self.prompt_ids = prompt_ids
        self.eos_id, self.pad_id = eos_id, pad_id
        self.bf16 = bf16
        self.missing_eos_penalty = missing_eos_penalty
        self.calls: list[list[float]] = []  # per generation batch: the raw normalised scores
        self.finished: list[list[bool]] = []  # per generation batch: which responses ended with EOS

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], **kwargs) -> list[float]:
        seqs = [self.prompt_ids[prompt_text(p)] + list(c) for p, c in zip(prompts, completion_ids)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            # HF's sequence-classification head reads each row's last non-pad token: the response's last.
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
        scores = (self.gain * logits.float() + self.bias).tolist()
        finished = [len(c) > 0 and c[-1] == self.eos_id for c in completion_ids]
        self.calls.append(scores)
        self.finished.append(finished)
        if self.missing_eos_penalty:
            return [s if f else s - self.missing_eos_penalty for s, f in zip(scores, finished)]
        return scores


def prompt_text(prompt: Any) -> str:
    """The user text of a one-turn conversational prompt (or the prompt itself when it is a string)."""
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def timed(fn: Callable, totals: dict[str, float], phase: str) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[phase] += time.perf_counter() - start
        return out
    return wrapper


def common_args(spec: dict) -> dict:
    """The GRPOConfig / RLOOConfig arguments both workers set, from the parent's spec."""
    batch = spec["batch_size"]
    return dict(
        output_dir=spec["output_dir"],
        report_to="none",
        use_cpu=True,
        bf16=spec["bf16"],
        seed=spec["seed"],
        learning_rate=spec["lr"],
        per_device_train_batch_size=batch,  # completions per step: batch / num_generations prompts
        gradient_accumulation_steps=1,
        num_generations=spec["samples_per_prompt"],
        num_iterations=1,  # one optimisation pass over each batch
        max_steps=spec["warmup_steps"] + spec["steps"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        epsilon=spec["cliprange"],
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        disable_dropout=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_worker(trainer_class: type, config_class: type, method_args: dict, spec_path: str, result_path: str) -> dict:
    """Train `trainer_class` as the spec says, time it, and write the result JSON; returns the result."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    prompts = spec["prompts"]
    prompt_ids = dict(zip(prompts, spec["prompt_ids"]))
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    # TRL tokenises a conversational prompt with this very call; the tokens must be alignloop's.
    trl_ids = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    mismatched = [p for p, ids in zip(prompts, trl_ids) if list(ids) != prompt_ids[p]]
    assert not mismatched, f"TRL's prompt tokens differ from alignloop's for {len(mismatched)} prompts: {mismatched[:2]}"

    attention = spec.get("attn_implementation", "sdpa")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32, attn_implementation=attention)
    policy.config.pad_token_id = tokenizer.pad_token_id
    reward = RewardModelScore(spec["reward_model"], prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id,
                              spec["bf16"], spec.get("missing_eos_penalty"), attention)

    args = config_class(**common_args(spec), **method_args)
    totals = {p: 0.0 for p in PHASES}
    clock = Clock(totals)
    setup_start = time.perf_counter()
    trainer = trainer_class(model=policy, reward_funcs=reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": conversations}),
                            processing_class=tokenizer, callbacks=[clock])
    generation = timed(trainer._generate_single_turn, totals, "generation")
    trainer._generate_single_turn = generation
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, totals, "scoring")
    train_start = time.perf_counter()
    trainer.train()
    train_end = time.perf_counter()

    batch, warm = spec["batch_size"], spec["warmup_steps"]
    total_steps = warm + spec["steps"]
    stamps = clock.stamps
    assert len(stamps) == total_steps, f"expected {total_steps} steps, TRL ran {len(stamps)}"
    assert len(reward.calls) == total_steps, f"expected {total_steps} generation batches, TRL scored {len(reward.calls)}"
    t0 = stamps[warm - 1] if warm > 0 else train_start
    timed_seconds = stamps[-1] - t0
    p0 = clock.phases[warm - 1] if warm > 0 else {p: 0.0 for p in PHASES}
    split = {p: clock.phases[-1][p] - p0[p] for p in PHASES}
    split["scoring"] -= split["generation"]  # the generation runs inside _generate_and_score_completions
    split["update"] = timed_seconds - split["generation"] - split["scoring"]  # update + TRL's bookkeeping
    final = [s for call in reward.calls[-spec["final_score_steps"]:] for s in call]
    result = {
        "trl_version": trl.__version__,
        "trainer": trainer_class.__name__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16": spec["bf16"],
        "beta": spec["beta"],
        "accelerate_mixed_precision": trainer.accelerator.mixed_precision,  # what bf16=True turned into
        "reference_model_loaded": getattr(trainer, "ref_model", None) is not None,
        "method_args": method_args,
        "steps_timed": spec["steps"],
        "warmup_steps_excluded": warm,
        "episodes_timed": batch * spec["steps"],
        "seconds_timed": timed_seconds,
        "episodes_per_second": batch * spec["steps"] / timed_seconds,
        "time_split_seconds": split,  # over the timed steps
        "seconds_setup": train_start - setup_start,
        "seconds_train_total": train_end - train_start,
        "step_seconds": [b - a for a, b in zip([train_start] + stamps[:-1], stamps)],
        # normalised RM score (before any missing-EOS penalty) of the last `final_score_steps` batches
        "final_score_mean": sum(final) / len(final),
        "score_per_step": [sum(c) / len(c) for c in reward.calls],
        "eos_rate_per_step": [sum(f) / len(f) for f in reward.finished],
        "kl_per_step": [log.get("kl") for log in clock.logs],
        "mean_length_per_step": [log.get("completions/mean_length") for log in clock.logs],
        "clip_ratio_per_step": [log.get("clip_ratio/region_mean") for log in clock.logs],
    }
    Path(result_path).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}))
    return result
