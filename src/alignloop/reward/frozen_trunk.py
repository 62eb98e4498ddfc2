"""Train only a reward model's top layers, its frozen lower trunk run once per distinct sequence.

Preference data repeats its texts: in the human-sentiment pairs each sentence sits in about four
pairs, and every epoch reads every pair again. With the embeddings and the lower L - k layers
frozen (`RewardTrainConfig.train_layers = k`), their output for a (prompt, response) never changes
during training, so `FrozenTrunk` computes it once per distinct sequence before the first step and
keeps it; every training step then runs only the top k layers, the final norm and the head, from
those states. The prompt's states are kept once per prompt (causal attention: a prompt's tokens
see nothing after them, so they are the same in every sequence that starts with it).

The trained items are re-expressed in *slot ids*: slot s is row s of `states` (slot 0: zeros, the
padding), so the packing code lays them out exactly as it lays out token ids, and the upper layers
read `states[slot_ids]` as their `inputs_embeds`.

The split is checked, not assumed (`check_split_exact`): on a few sequences, the lower pass then
the upper layers from its states must score what the whole model scores. Architectures whose
`inputs_embeds` are transformed before the first layer (GPT-2 adds position embeddings to them,
Gemma scales them) fail the check and are refused in one line.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import PreTrainedModel

from ..decoding import cache_argument_name
from ..device import autocast
from ..errors import ConfigError
from ..prompts import pad_right


def decoder_layers(model: PreTrainedModel) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(the module holding them, its attribute name, the list) of the transformer's decoder layers."""
    config = model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for owner in (model.base_model, *model.base_model.children()):
        for name, child in owner.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == count:
                return owner, name, child
    raise ConfigError(f"train_layers: cannot find the {count} decoder layers of this {config.model_type} model")


@contextlib.contextmanager
def only_layers(model: PreTrainedModel, layers: list[torch.nn.Module]) -> Iterator[None]:
    """The model runs only `layers` (the same modules, so their weights train) for the duration."""
    owner, name, full = decoder_layers(model)
    setattr(owner, name, torch.nn.ModuleList(layers))
    try:
        yield
    finally:
        setattr(owner, name, full)


def freeze_lower_trunk(model: PreTrainedModel, train_layers: int) -> int:
    """Freeze the input embeddings and all but the top `train_layers` decoder layers; returns the
    number of frozen layers. The final norm, the top layers and the head keep training."""
    _, _, layers = decoder_layers(model)
    if not 1 <= train_layers < len(layers):
        raise ConfigError(f"train_layers must be in [1, {len(layers) - 1}] for this {len(layers)}-layer model "
                          f"(0 trains them all), got {train_layers}")
    lower = len(layers) - train_layers
    for module in (model.get_input_embeddings(), *layers[:lower]):
        for p in module.parameters():
            p.requires_grad_(False)
    return lower


@torch.no_grad()
def lower_states(model: PreTrainedModel, sequences: list[tuple[int, tuple[int, ...]]], lower: int, pad_id: int,
                 precision: str, batch_size: int) -> tuple[dict[tuple[int, ...], torch.Tensor], list[torch.Tensor]]:
    """The residual stream after the first `lower` decoder layers, fp32: per distinct prompt, its
    (prompt_len, hidden) states, and per (prompt_len, tokens) sequence, its response's (len, hidden).

    Sequences are grouped by prompt; each batch of a prompt's responses (similar lengths, padded on
    the right: causal attention, so padding after a token never changes it) runs from the prompt's
    KV cache, so a prompt shared by thousands of responses (a chat template's system prompt and an
    instruction) is computed once per batch, not once per response. Only the lower layers run; a
    hook on the last one takes its output (the final norm still runs on it, and is dropped).
    """
    _, _, layers = decoder_layers(model)
    device = next(model.parameters()).device
    cache_arg = cache_argument_name(type(model.base_model))
    captured: list[torch.Tensor] = []
    hook = layers[lower - 1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (p, seq) in enumerate(sequences):
        by_prompt.setdefault(seq[:p], []).append(i)
    prompts: dict[tuple[int, ...], torch.Tensor] = {}
    responses: list[torch.Tensor | None] = [None] * len(sequences)
    try:
        with only_layers(model, list(layers[:lower])), autocast(device, precision):
            for prompt, members in by_prompt.items():
                members.sort(key=lambda i: len(sequences[i][1]))
                p = len(prompt)
                for start in range(0, len(members), batch_size):
                    idx = members[start:start + batch_size]
                    out = model.base_model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
                    prompts[prompt] = captured.pop()[0].float()
                    cache = out.cache if hasattr(out, "cache") else out.past_key_values
                    cache.reorder_cache(torch.zeros(len(idx), dtype=torch.long, device=device))
                    ids, mask = pad_right([list(sequences[i][1][p:]) for i in idx], pad_id)
                    width = len(ids[0])
                    model.base_model(input_ids=torch.tensor(ids, device=device),
                                     attention_mask=torch.tensor([[1] * p + m for m in mask], device=device),
                                     position_ids=torch.arange(p, p + width, device=device).expand(len(idx), width),
                                     use_cache=True, **{cache_arg: cache})
                    hidden = captured.pop().float()
                    for row, i in enumerate(idx):
                        responses[i] = hidden[row, :len(sequences[i][1]) - p].clone()
    finally:
        hook.remove()
    return prompts, responses  # type: ignore[return-value]


@dataclass
class FrozenTrunk:
    """The cached lower-trunk states of a training set, and the upper layers that read them."""

    lower: int  # frozen decoder layers
    upper: list[torch.nn.Module]  # the trained ones, the model's own modules
    states: torch.Tensor  # (slots, hidden) fp32; row 0 is the padding slot
    sequences: int  # distinct sequences run through the lower trunk
    seconds: float

    @classmethod
    def build(cls, model: PreTrainedModel, items: list, train_layers: int, pad_id: int, precision: str,
              batch_size: int) -> tuple["FrozenTrunk", list]:
        """Freeze the lower trunk, run it once over the distinct sequences of `items` (EncodedItems)
        and return the trunk with the items re-expressed in slot ids (same ranks, margins, prompt lengths)."""
        start = time.time()
        lower = freeze_lower_trunk(model, train_layers)
        # A sequence is its tokens and where its prompt ends: (prompt_len, tokens).
        distinct = list(dict.fromkeys((it.prompt_len, tuple(s)) for it in items for s in it.seqs))
        prompt_states, response_states = lower_states(model, distinct, lower, pad_id, precision, batch_size)
        # Slot layout: each prompt's tokens once, then each distinct sequence's response tokens.
        rows: list[torch.Tensor] = [torch.zeros(1, model.config.hidden_size, device=model.device)]
        prompt_slots: dict[tuple[int, ...], list[int]] = {}
        used = 1
        for prompt, states in prompt_states.items():
            prompt_slots[prompt] = list(range(used, used + len(prompt)))
            rows.append(states)
            used += len(prompt)
        seq_slots: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for (p, seq), states in zip(distinct, response_states):
            seq_slots[(p, seq)] = prompt_slots[seq[:p]] + list(range(used, used + len(states)))
            rows.append(states)
            used += len(states)
        _, _, layers = decoder_layers(model)
        trunk = cls(lower, list(layers[lower:]), torch.cat(rows), len(distinct), time.time() - start)
        slotted = [type(it)([seq_slots[(it.prompt_len, tuple(s))] for s in it.seqs], it.ranks, it.margin, it.prompt_len)
                   for it in items]
        return trunk, slotted

    def hidden(self, model: PreTrainedModel, batch) -> torch.Tensor:
        """The final hidden states of a packed batch of slot ids (an `RMBatch`), top layers only."""
        with only_layers(model, self.upper):
            return model.base_model(inputs_embeds=self.states[batch.input_ids], attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, use_cache=False).last_hidden_state

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def summary(self) -> dict:
        return {"train_layers": len(self.upper), "frozen_layers": self.lower, "cached_sequences": self.sequences,
                "cached_tokens": self.states.shape[0] - 1, "cache_mib": round(self.nbytes / 2**20, 1),
                "cache_seconds": round(self.seconds, 2)}
