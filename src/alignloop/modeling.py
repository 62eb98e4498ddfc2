"""Building, loading and saving models as standard Hugging Face directories.

Everything the toolkit writes loads with `AutoModelForCausalLM.from_pretrained`
(or `AutoModelForSequenceClassification` for the reward model) and
`AutoTokenizer.from_pretrained`, with no alignloop code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import InputError


def build_causal_lm(tokenizer: PreTrainedTokenizerBase, n_layer: int = 4, n_embd: int = 256, n_head: int = 4,
                    n_positions: int = 256, dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    """A small GPT-2, randomly initialised (seeded), sized to the tokenizer."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return use_fast_kernels(GPT2LMHeadModel(config))


class GELUTanh(torch.nn.Module):
    """GPT-2's activation ("gelu_new": GELU's tanh approximation) as one fused kernel.

    HF's `NewGELUActivation` writes the formula out, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))),
    which is eight elementwise kernels forward and more backward, each streaming the MLP's
    4×-wide activations through memory. `F.gelu(approximate="tanh")` is the same function in one
    kernel, equal to float rounding (docs/benchmarks.md, "Measurements behind the code").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def sdpa_with_fp32_training_on_cpu(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """HF's SDPA attention, except that on the CPU a bf16 attention that will be differentiated runs in fp32.

    torch's CPU flash-attention kernel is fast forward in bf16 but slow backward, slower than in
    fp32 at PPO's update shapes (docs/benchmarks.md, "Measurements behind the code"). Attention is
    a small share of the model's FLOPs, so fp32 there costs little and is the more exact of the two.
    Forwards without gradients (generation, scoring) and other devices keep bf16.
    """
    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                  attention_mask, **kwargs)
        return out.to(query.dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


FAST_SDPA = "alignloop_sdpa"


def _register_fast_sdpa() -> None:
    AttentionInterface.register(FAST_SDPA, sdpa_with_fp32_training_on_cpu)
    AttentionMaskInterface.register(FAST_SDPA, sdpa_mask)  # the same masks as "sdpa"


def use_fast_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Swap slow kernels for equal, faster ones, in place; returns the model.

    - every written-out "gelu_new" module becomes `GELUTanh`;
    - a model on HF's "sdpa" attention moves to `sdpa_with_fp32_training_on_cpu` (the same
      kernel and masks; fp32 only for a differentiated bf16 attention on the CPU).

    Only modules and the in-memory attention choice change: the saved config still says
    "gelu_new" and records no attention implementation, so a saved model loads anywhere exactly
    as before. Other models are left as they are.
    """
    from transformers.activations import NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    if isinstance(model, PreTrainedModel) and getattr(model.config, "_attn_implementation", None) == "sdpa":
        _register_fast_sdpa()
        model.set_attn_implementation(FAST_SDPA)
    return model


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "no such model directory" if not path.exists() else "not a directory")
    if not (path / "config.json").is_file():
        raise InputError(path, "not a Hugging Face model directory (no config.json)")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A separate pad token, so masking padding never masks the EOS (see tokenizer.py).
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu",
                   tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Load a causal LM in fp32 (autocast picks the matmul dtype), in eval mode: dropout off."""
    path = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # we added a pad token
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return use_fast_kernels(model).to(device).eval()


def load_scalar_model(path: str | Path) -> PreTrainedModel:
    """A sequence classifier with one output (a reward model or critic directory), fp32, fast kernels."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    return use_fast_kernels(model)


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                   max_new_tokens: int | None = None) -> Path:
    """Weights as safetensors, tokenizer, and a generation config that stops at EOS and pads with pad."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "generation_config") and model.can_generate():
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=max_new_tokens or 64,
        )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability to 0, so train mode (needed by gradient checkpointing) stays deterministic.

    RL fine-tuning compares log-probs of the same tokens at rollout and update time;
    dropout would make them differ by noise alone.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval()


def count_matmul_params(model: PreTrainedModel) -> int:
    """Parameters that take part in matmuls per token (all 2-D weights but the input embedding)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not emb)
    if out is not None and out.weight is emb:  # tied: the LM head is a matmul even though it shares the embedding
        total += emb.numel()
    return total
