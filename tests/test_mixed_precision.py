"""bf16 weights in the model + fp32 masters in the optimiser compute exactly what plain bf16 autocast does.

PPO has its own end-to-end check (test_ppo.py); these cover the LM loop (pretraining, SFT) and the
reward model's training, and the helper's own bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignloop.mixed_precision import MasterWeights, cast_frozen_matmul_weights, matmul_weights
from alignloop.modeling import build_causal_lm
from alignloop.training import IGNORE, LMBatch, train_lm


def test_matmul_weights_are_the_linear_layers_not_the_tied_embedding(tiny_tokenizer):
    model = build_causal_lm(tiny_tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=128)
    names = [n for n, _ in matmul_weights(model)]
    assert len(names) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per layer
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in names)
    assert "lm_head.weight" not in names and "transformer.wte.weight" not in names  # tied: stays fp32
    with pytest.raises(ValueError, match="trained"):
        cast_frozen_matmul_weights(model)  # its weights still require grad


def test_master_gradients_accumulate_in_fp32_and_the_step_reaches_the_model(tiny_tokenizer):
    model = build_causal_lm(tiny_tokenizer, n_layer=1, n_embd=64, n_head=2, n_positions=128)
    masters = MasterWeights([model])
    name, weight = matmul_weights(model)[0]
    master = masters.master_of[id(weight)]
    assert weight.dtype == torch.bfloat16 and master.dtype == torch.float32
    g1, g2 = torch.randn_like(weight), torch.randn_like(weight)
    weight.grad = g1.clone()
    masters.accumulate_grads()
    weight.grad = g2.clone()
    masters.accumulate_grads()  # a second micro-batch adds
    assert weight.grad is None and torch.equal(master.grad, g1.float() + g2.float())
    with torch.no_grad():
        master.add_(1.0)
    masters.copy_masters_to_models()
    assert torch.equal(weight, master.bfloat16())
    master.grad = None  # what optimizer.zero_grad(set_to_none=True) does
    weight.grad = g2.clone()
    masters.accumulate_grads()  # a new step starts from this backward alone, in the same buffer
    assert torch.equal(master.grad, g2.float())
    assert masters.state_dict(0)[name].dtype == torch.float32
    masters.release()
    assert weight.dtype == torch.float32 and torch.equal(weight, master)


def plain_autocast(models, enabled=True):
    """MasterWeights switched off: the fp32 model under autocast, as before masters existed."""
    return MasterWeights(models, enabled=False)


def lm_batches(tok, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(3, len(tok), (4, 24), generator=gen)
        labels = ids.clone()
        labels[:, :4] = IGNORE
        yield LMBatch(ids, torch.ones_like(ids), labels)


def test_lm_training_in_bf16_is_the_same_with_or_without_masters(tiny_tokenizer, monkeypatch):
    import alignloop.training as training

    def run():
        model = build_causal_lm(tiny_tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=0)
        losses = train_lm(model, lm_batches(tiny_tokenizer, 6, 0), 6, 3e-3, 0.1, 2, 0.05, "bf16", "test")  # clipping
        return model, losses

    clipped_shapes = []
    real_clip = training.clip_grad_norm

    def recording_clip(params, max_norm):
        params = list(params)
        clipped_shapes.append([tuple(p.shape) for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(training, "clip_grad_norm", recording_clip)
    ours, our_losses = run()
    # The gradient norm sums the tensors in the model's order, so its float sum rounds as without
    # masters (the optimiser's order, matrices first, changed the demo's pretraining in the 4th digit).
    assert clipped_shapes[0] == [tuple(p.shape) for p in ours.parameters()]
    monkeypatch.setattr(training, "MasterWeights", plain_autocast)
    plain, plain_losses = run()
    assert our_losses == plain_losses
    a, b = ours.state_dict(), plain.state_dict()
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)  # released: fp32 again
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"],
                           build_causal_lm(tiny_tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=128,
                                           seed=0).state_dict()["transformer.h.0.mlp.c_fc.weight"])  # it trained


@pytest.mark.slow
def test_reward_training_in_bf16_is_the_same_with_or_without_masters(tiny_lm_dir, fortunes, tmp_path, monkeypatch):
    import alignloop.training as training
    from alignloop.reward.train import RewardTrainConfig, train_reward_model
    from test_reward_train import sentiment_pairs, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(fortunes, 64, 0))
    held = write_jsonl(tmp_path / "held.jsonl", sentiment_pairs(fortunes, 32, 1))

    def run(out: Path) -> dict:
        return train_reward_model(RewardTrainConfig(
            model=tiny_lm_dir, data=data, held_out_data=held, out_dir=out, epochs=1, batch_size=8,
            gradient_accumulation_steps=2, lr=3e-3, max_length=96, checkpoint_every=2, normalize_samples=16,
            precision="bf16", device="cpu"))

    ours = run(tmp_path / "masters")
    monkeypatch.setattr(training, "MasterWeights", plain_autocast)  # model_optimizer makes the reward model's
    plain = run(tmp_path / "autocast")
    for key in ("final_train_loss", "train_accuracy", "held_out_accuracy", "held_out_loss", "normalization"):
        assert ours[key] == plain[key], key
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("masters", "autocast"))
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)


def test_a_loss_that_turns_non_finite_stops_training_naming_the_step(tiny_tokenizer):
    from alignloop.training import TrainingDiverged

    model = build_causal_lm(tiny_tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")  # as a blown-up update would leave it
    with pytest.raises(TrainingDiverged, match=r"sft: non-finite loss at step 1 .*no checkpoint was kept"):
        train_lm(model, lm_batches(tiny_tokenizer, 3, 0), 3, 1e-3, 0.0, 1, 1.0, "fp32", "sft")


def test_a_pipeline_stopped_by_the_guard_records_it_and_the_report_lists_guards(tiny_lm_dir, tmp_path):
    """A blown-up model stops SFT inside the pipeline: one line, and out/guards.json names the stage and step."""
    import json

    from alignloop.modeling import load_causal_lm, load_tokenizer, save_model_dir
    from alignloop.pipeline import PipelineSpec, run_pipeline
    from alignloop.report import guards_fired
    from alignloop.training import TrainingDiverged

    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir, "cpu", tok)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_model_dir(model, tok, tmp_path / "nan_model")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me {i}", "response": " a short answer"}) + "\n"
                            for i in range(40)))
    sections = {"sft": {"model": str(tmp_path / "nan_model"), "data": str(data), "batch_size": 8,
                        "checkpoint_every": 0, "precision": "fp32", "device": "cpu"}}
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 1"):
        run_pipeline(PipelineSpec(sections, out, 1, False, "test"))
    (fired,) = json.loads((out / "guards.json").read_text())
    assert fired["stage"] == "sft" and "non-finite loss at step 1" in fired["what"]
    # what the report lists from the stage summaries, beside that
    rounds = [{"round": 1, "ppo": {"stopped": "stopped at step 7: KL ...", "rollbacks": 2, "dropped_prompts_too_long": 0},
               "sample": {"dropped_prompts": 3}}]
    listed = guards_fired(rounds, [fired])
    assert [g["guard"] for g in listed] == ["collapse stop", "rollback", "prompt too long",
                                            "non-finite loss or gradients"]
