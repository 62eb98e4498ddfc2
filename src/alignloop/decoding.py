"""KV-cache decoders: what `rollout.sample_responses` calls to get the next-token logits.

Two with one interface (`start`, `keep`, `step`):

- `HFDecoder` runs any HF causal LM through its own forward and its own (dynamic) KV cache.
- `GPT2Decoder` runs a plain GPT-2 (the embedded default model) layer by layer from the same
  modules, with a KV cache allocated once for the whole response. It computes what
  `GPT2LMHeadModel.forward` computes, op for op (the same modules, in the same order, under
  the caller's autocast), minus HF's per-step bookkeeping: building a 4-D mask, growing the
  cache by concatenation, the attention-interface dispatch. On small models that bookkeeping is
  a large share of a decode step (docs/benchmarks.md, "Measurements behind the code").

`make_decoder` picks `GPT2Decoder` where it applies (a GPT2LMHeadModel in eval mode with
GPT-2's standard attention) and `HFDecoder` everywhere else (other architectures, peft
wrappers, training mode).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, PreTrainedModel


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real tokens of its row (0 for padding on the left)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.lru_cache(maxsize=None)
def cache_argument_name(model_class: type) -> str:
    # transformers 5 names the KV cache argument `cache`; 4.x called it `past_key_values`.
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFDecoder:
    """Any HF causal LM: its own forward with `use_cache=True`, one new token per row per step."""

    def __init__(self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 max_new_tokens: int):
        self.model, self.prompt_ids, self.prompt_mask = model, prompt_ids, prompt_mask
        # A peft wrapper forwards **kwargs: ask the wrapped model which name its cache argument has.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_arg = cache_argument_name(type(base))
        # The whole attention mask allocated once; after t steps the model attends to the first P + t columns.
        batch = prompt_ids.shape[0]
        self.mask = torch.cat([prompt_mask, prompt_mask.new_ones((batch, max_new_tokens))], dim=1)
        self.columns = prompt_ids.shape[1]
        self.positions = position_ids_from_mask(prompt_mask)  # (batch, P)
        self.next_position = self.positions[:, -1:] + 1
        self.cache = None

    def _forward(self, **inputs) -> torch.Tensor:
        out = self.model(use_cache=True, **inputs)
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1]

    def start(self) -> torch.Tensor:
        """(batch, vocab) logits after the prompt."""
        return self._forward(input_ids=self.prompt_ids, attention_mask=self.prompt_mask,
                             position_ids=self.positions, logits_to_keep=1)

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these rows only (indices into the current batch)."""
        self.cache.reorder_cache(rows)  # index_select on every layer's keys and values
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token per row; (batch, vocab) logits for the next one."""
        self.columns += 1
        logits = self._forward(input_ids=token[:, None], attention_mask=self.mask[:, :self.columns],
                               position_ids=self.next_position, **{self.cache_arg: self.cache})
        self.next_position = self.next_position + 1
        return logits


def gpt2_decoder_applies(model: torch.nn.Module) -> bool:
    """A plain GPT-2 LM whose forward `GPT2Decoder` reproduces (eval mode: dropout is a no-op)."""
    if type(model) is not GPT2LMHeadModel or model.training:
        return False
    c = model.config
    return (c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx and not c.reorder_and_upcast_attn
            and not c.add_cross_attention)


class GPT2Decoder:
    """GPT-2 with a KV cache of fixed size: (layers, batch, heads, P + max_new_tokens, head_dim) keys and values.

    Column j of the cache holds the token at column j of [left-padded prompt | response]. A query
    attends to the columns up to its own that are not padding (and always to itself, so a padding
    row's attention is defined; nothing reads a padding row's output).
    """

    def __init__(self, model: GPT2LMHeadModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 max_new_tokens: int):
        self.model, self.prompt_ids = model, prompt_ids
        c = model.config
        self.heads, self.head_dim = c.n_head, c.n_embd // c.n_head
        self.scaling = self.head_dim ** -0.5  # GPT-2's (GPT2Attention.scaling), not SDPA's own 1/sqrt(d)
        batch, self.columns = prompt_ids.shape
        self.key_valid = torch.cat([prompt_mask.bool(), prompt_mask.new_ones((batch, max_new_tokens), dtype=torch.bool)],
                                   dim=1)  # (batch, P + R)
        self.positions = position_ids_from_mask(prompt_mask)  # (batch, P)
        self.next_position = self.positions[:, -1:] + 1
        self.keys: torch.Tensor | None = None  # allocated by the first forward, in the dtype autocast gives k and v
        self.values: torch.Tensor | None = None
        self.max_columns = self.columns + max_new_tokens

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, start: int,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens at columns start .. start+T-1: write their keys and values, return the last position's logits."""
        gpt2 = self.model.transformer
        batch, new = input_ids.shape
        end = start + new
        hidden = gpt2.wte(input_ids) + gpt2.wpe(position_ids)  # (batch, T, n_embd)
        for layer, block in enumerate(gpt2.h):
            query, key, value = block.attn.c_attn(block.ln_1(hidden)).split(block.attn.split_size, dim=2)
            query, key, value = (t.view(batch, new, self.heads, self.head_dim).transpose(1, 2)
                                 for t in (query, key, value))  # (batch, heads, T, head_dim)
            if self.keys is None:
                shape = (len(gpt2.h), batch, self.heads, self.max_columns, self.head_dim)
                self.keys = key.new_empty(shape)
                self.values = value.new_empty(shape)
            self.keys[layer, :, :, start:end] = key
            self.values[layer, :, :, start:end] = value
            attended = F.scaled_dot_product_attention(query, self.keys[layer, :, :, :end],
                                                      self.values[layer, :, :, :end], attn_mask=attention_mask,
                                                      scale=self.scaling)
            attended = attended.transpose(1, 2).reshape(batch, new, -1)
            hidden = block.attn.c_proj(attended) + hidden  # the residual stream, as GPT2Block adds it
            hidden = hidden + block.mlp(block.ln_2(hidden))
        hidden = gpt2.ln_f(hidden[:, -1:])
        return self.model.lm_head(hidden)[:, -1]

    def start(self) -> torch.Tensor:
        P = self.columns
        causal = torch.ones((P, P), dtype=torch.bool, device=self.key_valid.device).tril()
        # (batch, 1, P, P): earlier-or-same columns that are real tokens, plus the diagonal for padding rows.
        mask = (causal & self.key_valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=causal.device)
        return self._forward(self.prompt_ids, self.positions, 0, mask)

    def keep(self, rows: torch.Tensor) -> None:
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        self.key_valid, self.next_position = self.key_valid[rows], self.next_position[rows]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        column = self.columns
        self.columns += 1
        mask = self.key_valid[:, None, None, :column + 1]  # (batch, 1, 1, columns): one query per row
        logits = self._forward(token[:, None], self.next_position, column, mask)
        self.next_position = self.next_position + 1
        return logits


def make_decoder(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 max_new_tokens: int) -> HFDecoder | GPT2Decoder:
    if gpt2_decoder_applies(model):
        return GPT2Decoder(model, prompt_ids, prompt_mask, max_new_tokens)
    return HFDecoder(model, prompt_ids, prompt_mask, max_new_tokens)
