"""The GPT-2 decoder (a KV cache allocated once, no HF bookkeeping) against the model's own forward."""

from __future__ import annotations

import pytest
import torch

from alignloop.decoding import GPT2Decoder, HFDecoder, gpt2_decoder_applies, make_decoder
from alignloop.device import autocast
from alignloop.modeling import build_causal_lm
from alignloop.mixed_precision import cast_frozen_matmul_weights
from alignloop.prompts import encode_prompt
from alignloop.rollout import left_pad, sample_responses


def sharp_model(tok, seed=0):
    model = build_causal_lm(tok, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=seed).eval()
    with torch.no_grad():  # sharp random weights: logits that differ a lot between tokens and rows
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpt2_decoder_gives_the_models_own_logits_through_prefill_steps_and_dropped_rows(tiny_tokenizer, precision):
    tok = tiny_tokenizer
    model = sharp_model(tok).requires_grad_(False)
    if precision == "bf16":
        cast_frozen_matmul_weights(model)  # as PPO holds its frozen models
    texts = ["Love is", "A much longer prompt than the other one", "Never", "The sea"]
    ids, mask = left_pad([encode_prompt(tok, t) for t in texts], tok.pad_token_id, torch.device("cpu"))
    assert mask[:, 0].sum() < len(texts)  # some rows start with padding
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        ours, theirs = GPT2Decoder(model, ids, mask, 6), HFDecoder(model, ids, mask, 6)
        a, b = ours.start(), theirs.start()
        tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
        rows = len(ids)
        for step in range(5):
            assert a.shape == b.shape == (rows, len(tok))
            torch.testing.assert_close(a.float(), b.float(), **tol)
            token = torch.randint(0, len(tok), (rows,), generator=gen)
            if step == 2:  # rows 0 and 2 end: both decoders continue with rows 1 and 3 only
                keep = torch.tensor([1, 3])
                ours.keep(keep)
                theirs.keep(keep)
                token, rows = token[keep], len(keep)
            a, b = ours.step(token), theirs.step(token)


def test_the_gpt2_decoder_is_used_only_where_it_reproduces_the_model(tiny_tokenizer):
    model = sharp_model(tiny_tokenizer)
    ids, mask = torch.ones((1, 3), dtype=torch.long), torch.ones((1, 3), dtype=torch.long)
    assert isinstance(make_decoder(model, ids, mask, 4), GPT2Decoder)
    model.train()  # dropout would be live: the model's own forward
    assert not gpt2_decoder_applies(model) and isinstance(make_decoder(model, ids, mask, 4), HFDecoder)
    model.eval()
    model.config.scale_attn_by_inverse_layer_idx = True  # attention this decoder does not implement
    assert not gpt2_decoder_applies(model)


def test_sampling_is_the_same_with_either_decoder(tiny_tokenizer, monkeypatch):
    """Same seed, same tokens: the sampler sees the same distributions whichever decoder feeds it."""
    import alignloop.rollout as rollout

    tok = tiny_tokenizer
    model = sharp_model(tok, seed=1)
    ids, mask = left_pad([encode_prompt(tok, t) for t in ["Love is", "Never", "A much longer prompt"]],
                         tok.pad_token_id, torch.device("cpu"))

    def sample():
        return sample_responses(model, ids, mask, 12, tok.eos_token_id, tok.pad_token_id, temperature=1.0,
                                generator=torch.Generator().manual_seed(3))

    fast = sample()
    monkeypatch.setattr(rollout, "make_decoder", lambda *args: HFDecoder(*args))
    slow = sample()
    assert torch.equal(fast.responses, slow.responses) and torch.equal(fast.response_mask, slow.response_mask)
