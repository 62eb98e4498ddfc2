"""Corpus, tokenizer, model directories, SFT masking and generation."""

from __future__ import annotations

import json
import os
import math
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignloop.corpus import load_corpus, split_corpus
from alignloop.generation import SamplingSettings, generate
from alignloop.jsonl import read_jsonl
from alignloop.modeling import FAST_SDPA, GELUTanh, load_causal_lm, load_tokenizer, sdpa_with_fp32_training_on_cpu
from alignloop.pretrain import PretrainConfig, pack_documents, pretrain
from alignloop.prompts import encode_prompt, encode_response
from alignloop.sft import SFTConfig, corpus_pairs, pair_batches, sft
from alignloop.training import IGNORE, LMBatch, clip_grad_norm, lm_loss_sum


def test_fortune_format_and_txt_and_jsonl(tmp_path):
    (tmp_path / "quotes").write_text("First  quote\nspans lines.\n%\nSecond quote.\n%\n")
    (tmp_path / "quotes.dat").write_bytes(b"")  # strfile's index marks a fortune file
    (tmp_path / "notes.txt").write_text("Para one.\n\nPara two\nstill two.\n")
    (tmp_path / "more.jsonl").write_text('{"text": "From jsonl."}\n')
    docs = load_corpus(tmp_path)
    assert docs == ["From jsonl.", "Para one.", "Para two still two.", "First quote spans lines.", "Second quote."]


def test_default_corpus_is_real_and_split_is_disjoint(fortunes):
    assert len(fortunes) > 1000
    train, held = split_corpus(fortunes + fortunes[:10], 0.1, seed=0)
    assert not set(train) & set(held)
    assert split_corpus(fortunes, 0.1, seed=0) == split_corpus(fortunes, 0.1, seed=0)


def test_tokenizer_special_tokens_distinct_and_loadable(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)  # no alignloop code
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    text = "Wit is educated insolence. -- Aristotle"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert encode_prompt(tok, "Hello")[0] == tok.bos_token_id
    assert encode_response(tok, " world")[-1] == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_fused_gelu_is_the_same_model_and_saves_as_gelu_new(tiny_lm_dir, tmp_path):
    """load_causal_lm swaps GPT-2's written-out GELU for one kernel: same outputs and gradients, same saved config."""
    tok = load_tokenizer(tiny_lm_dir)
    ours = load_causal_lm(tiny_lm_dir, "cpu", tok)
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    assert all(isinstance(block.mlp.act, GELUTanh) for block in ours.transformer.h)
    assert not any(isinstance(m, GELUTanh) for m in plain.modules())
    ids = torch.tensor([encode_prompt(tok, "Love is a many splendoured thing")])
    a, b = ours(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    a.logsumexp(-1).sum().backward()
    b.logsumexp(-1).sum().backward()
    wa, wb = ours.transformer.h[0].mlp.c_fc.weight.grad, plain.transformer.h[0].mlp.c_fc.weight.grad
    assert torch.allclose(wa, wb, atol=1e-5 * float(wb.abs().max()))
    ours.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["activation_function"] == "gelu_new"
    # The attention swap is in memory only: the saved config names none, plain HF loads plain SDPA.
    assert ours.config._attn_implementation == FAST_SDPA
    assert not any("attn_implementation" in key for key in saved)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def test_fast_sdpa_runs_a_differentiated_bf16_attention_in_fp32_and_leaves_the_rest_alone():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, ..., :2] = False  # row 0 is left-padded by two tokens
    mask[0, :, :2, 0] = True  # (a padded query still attends somewhere, as HF's masks ensure)
    exact, _ = sdpa_attention_forward(module, q, k, v, mask)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out, _ = sdpa_with_fp32_training_on_cpu(module, qb, kb, vb, mask)
    assert out.dtype == torch.bfloat16  # the caller's dtype, whatever ran inside
    assert torch.allclose(out.float(), exact, atol=2e-2)
    out.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad).all()
    # In fp32 the inputs go in unconverted: fp32 gives exactly HF's SDPA, gradients or not.
    assert torch.equal(sdpa_with_fp32_training_on_cpu(module, q, k, v, mask)[0], exact)
    with torch.no_grad():  # no gradient: the bf16 kernel, exactly as HF's SDPA runs it
        plain, _ = sdpa_attention_forward(module, qb, kb, vb, mask)
        assert torch.equal(sdpa_with_fp32_training_on_cpu(module, qb, kb, vb, mask)[0], plain)


def test_clip_grad_norm_by_hand_and_against_torch():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert float(clip_grad_norm([p], 10.0)) == 5.0 and p.grad.tolist() == [3.0, 4.0]  # under the cap: untouched
    assert float(clip_grad_norm([p], 1.0)) == 5.0
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8]))
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.zeros(n, 3)) for n in (4, 7)] + [torch.nn.Parameter(torch.zeros(5))]
    theirs = [torch.nn.Parameter(torch.zeros_like(q)) for q in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    ours[1].grad = None  # a parameter without a gradient is skipped, as torch skips it
    theirs[1].grad = None
    n_ours, n_theirs = clip_grad_norm(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert torch.allclose(n_ours, n_theirs)
    assert all(torch.allclose(a.grad, b.grad) for a, b in zip(ours, theirs) if a.grad is not None)


def test_pack_documents_cuts_blocks():
    blocks = pack_documents([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 2]], block_size=4)
    assert blocks.tolist() == [[1, 5, 6, 2], [1, 7, 2, 1]]


def test_corpus_pairs_split_after_first_words():
    pairs = corpus_pairs(["one two three four five six"], random.Random(0), 2, 3)
    p = pairs[0]
    assert (p["prompt"] + p["response"]) == "one two three four five six"
    assert p["response"].startswith(" ") and 2 <= len(p["prompt"].split()) <= 3


def test_sft_labels_cover_response_only(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    p, r = encode_prompt(tok, "A penny saved"), encode_response(tok, " is a penny earned.")
    short_p, short_r = encode_prompt(tok, "Hi"), encode_response(tok, " there.")
    batch = next(pair_batches([(p, r), (short_p, short_r)], 2, tok.pad_token_id, "cpu", None))
    labels = batch.labels.tolist()
    assert labels[0] == [IGNORE] * len(p) + r
    assert labels[1] == [IGNORE] * len(short_p) + short_r + [IGNORE] * (len(p) + len(r) - len(short_p) - len(short_r))
    assert batch.attention_mask[1].sum() == len(short_p) + len(short_r)


def test_lm_loss_sum_takes_labelled_positions_only_by_hand():
    class FixedLogits(torch.nn.Module):  # position t's logits over a 2-token vocabulary, whatever the input
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])})

    # Position t predicts label t+1: position 0 -> 1 and position 1 -> 0 count; the last position predicts
    # nothing, and label 0 (a prompt token, IGNORE) is never predicted.
    batch = LMBatch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                    torch.tensor([[IGNORE, 1, 0]]))
    loss, n = lm_loss_sum(FixedLogits(), batch, "fp32")
    by_hand = math.log(2) + math.log1p(math.exp(-2.0))  # -log 1/2, -log e^2/(e^2 + 1)
    assert n == 2 and loss.item() == pytest.approx(by_hand, abs=1e-6)
    batch.labels[0, 2] = IGNORE  # a padded position adds nothing
    loss, n = lm_loss_sum(FixedLogits(), batch, "fp32")
    assert n == 1 and loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_batched_left_padded_generation_matches_one_by_one(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir, "cpu", tok)
    prompts = ["A", "The early bird catches the worm, but", "Never"]
    settings = SamplingSettings(max_new_tokens=8, greedy=True, batch_size=8)
    batched = generate(model, tok, prompts, settings, show_progress=False)
    single = [generate(model, tok, [p], settings, show_progress=False)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.prompt for c in batched] == prompts


def test_generation_seeded_and_truncated_at_eos(tiny_lm_dir):
    tok = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir, "cpu", tok)
    settings = SamplingSettings(max_new_tokens=12, seed=3)
    a = generate(model, tok, ["Hello"] * 4, settings, show_progress=False)
    b = generate(model, tok, ["Hello"] * 4, settings, show_progress=False)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for c in a:
        if c.finished:
            assert c.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == 12


def test_tiny_pretrain_then_sft_write_hf_dirs_and_learn(tmp_path, fortunes):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in fortunes[:600]))
    base = tmp_path / "base"
    s = pretrain(PretrainConfig(out_dir=base, corpus=str(corpus), vocab_size=400, n_layer=1, n_embd=32, n_head=2,
                                block_size=64, batch_size=16, epochs=1, held_out_fraction=0.1, warmup_steps=5))
    assert s["held_out_perplexity"] < 400  # better than uniform over the vocabulary
    assert (base / "model.safetensors").is_file() and (base / "alignloop_pretrainconfig.yaml").is_file()

    sft_dir = tmp_path / "sft"
    s2 = sft(SFTConfig(model=base, out_dir=sft_dir, corpus=str(corpus), batch_size=16, epochs=1, warmup_steps=5))
    ppl = s2["held_out_response_perplexity"]
    assert ppl["after_sft"] < ppl["before_sft"]
    tok = AutoTokenizer.from_pretrained(sft_dir)
    assert tok.chat_template and AutoModelForCausalLM.from_pretrained(sft_dir) is not None
    held = read_jsonl(sft_dir / "held_out_pairs.jsonl", required={"prompt": str, "response": str})
    assert held and (sft_dir / "train_prompts.jsonl").is_file()


def test_sft_reads_user_pairs_and_counts_dropped(tmp_path, tiny_lm_dir):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}", "completion": " answer " * (1 if i % 5 else 100)} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = sft(SFTConfig(model=tiny_lm_dir, out_dir=tmp_path / "o", data=data, max_length=64, batch_size=8,
                      epochs=1, warmup_steps=1))
    assert s["pairs"]["dropped_too_long"] == 8  # every fifth pair is 100 words long


def test_a_finished_stage_hands_freed_heap_memory_back_to_the_system():
    from alignloop.device import return_freed_memory
    from alignloop.stage import resident_memory_gib

    chunks = [torch.ones(20_000) for _ in range(10_000)]  # 80 KB each, below glibc's mmap threshold: heap
    keep = chunks[-1].clone()  # allocated above them, so the freed heap is not at its top
    del chunks
    held = resident_memory_gib()
    return_freed_memory()
    assert resident_memory_gib() < held - 0.5  # 0.75 GiB freed, most of it returned
    assert keep.sum() == 20_000


@pytest.mark.parametrize("environ, expected", [({}, len(os.sched_getaffinity(0))), ({"OMP_NUM_THREADS": "1"}, 1),
                                               ({"OMP_NUM_THREADS": "lots"}, None)])
def test_stages_set_their_thread_count_even_when_torch_already_has_it(environ, expected, monkeypatch):
    """Once `torch.set_num_threads` has been called, CPU kernels add up in another order: a stage must
    call it in a fresh process too, or it would not repeat a run made after something else set it."""
    from alignloop.device import set_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: expected)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    set_cpu_threads()
    assert calls == ([expected] if expected is not None else [])


PAGE_FAULTS_PROBE = """
import resource, torch
from alignloop.device import keep_freed_memory
kept = keep_freed_memory()
def faults_of_a_step():
    # A training step's pattern: large temporaries (above glibc's largest mmap threshold, 32 MB)
    # made, written and all freed by the step's end.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(n * 2**20, dtype=torch.uint8) for n in (64, 40, 72)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()
print(kept, sum(faults_of_a_step() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("environment, kept", [({}, True), ({"ALIGNLOOP_KEEP_FREED_MEMORY": "0"}, False),
                                               ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False)])
def test_keep_freed_memory_reuses_freed_large_blocks_without_page_faults(environment, kept):
    # Three steps of 176 MB are 135,168 pages: mapped fresh, every one faults. Kept, the blocks
    # come back from malloc's heap; a few fault still, where posix_memalign's padding makes a
    # freed block too small for the next request (12 probes here: 6,144-18,433 faults).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}, **environment}
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout
    was_kept, faults = out.split()
    assert was_kept == str(kept)
    assert (int(faults) < 40_000) if kept else (int(faults) > 120_000), out
