"""bf16 matmul weights held by the models themselves, fp32 master weights held by the optimiser.

Under bf16 autocast every forward casts each fp32 matmul weight to bf16, and every
backward casts each bf16 weight gradient back to fp32 into freshly allocated memory.
For PPO's 8 x 512 policy and critic on a 2-core CPU that was ~0.25 s of a 2.3 s step
(timed per cast inside the step): 10 forwards' worth of weight casts plus 8 backwards'
worth of gradient casts, the gradient ones 5-8x slower in place than the same cast
timed alone (fresh pages, cold caches).

So, with the same numbers bit for bit:
- a model that trains keeps bf16 copies of its matmul weights as its parameters; the
  optimiser steps fp32 masters. After each backward the bf16 gradients are added into
  persistent fp32 buffers (the masters' .grad), and after each optimiser step the masters
  are rounded into the bf16 weights in place. Autocast would have computed with the same
  bf16 roundings of the same fp32 weights and produced the same bf16 gradients.
- a frozen model (PPO's reference and reward model, a LoRA policy's base) stores its matmul
  weights in bf16 once: autocast would cast them to the same values on every forward (it
  caches casts only of weights that train, so a frozen weight is cast again at every
  decoding step).

Only the weights of Linear / GPT-2 Conv1D layers change dtype; embeddings (and an LM head
tied to them), norms and biases stay fp32 exactly as under plain autocast, so the residual
stream, layer norms and everything after the logits keep their precision. Every forward of
such a model must run under bf16 autocast (alignloop's forwards do, via `device.autocast`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers.pytorch_utils import Conv1D


def matmul_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, weight) of every Linear / Conv1D layer whose weight is not also an input embedding."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    tied = embeddings.weight if embeddings is not None else None
    found, seen = [], set()
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight is not tied and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found.append((f"{module_name}.weight" if module_name else "weight", module.weight))
    return found


@torch.no_grad()
def cast_frozen_matmul_weights(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16,
                               skip_trained: bool = False) -> torch.nn.Module:
    """Store a frozen model's matmul weights in `dtype` (what autocast would cast them to each forward).
    `skip_trained`: the model trains some of its matmul weights (LoRA's adapters), which stay as they are."""
    for name, weight in matmul_weights(model):
        if weight.requires_grad:
            if skip_trained:
                continue
            raise ValueError(f"{name} is trained; use MasterWeights for a model that trains")
        weight.data = weight.data.to(dtype)
    return model


class MasterWeights:
    """bf16 matmul weights in the models, fp32 masters (and their gradients) for the optimiser.

    Use: build it before the optimiser and give the optimiser `optimizer_params(model)`;
    call `accumulate_grads()` after every backward and `copy_masters_to_models()` after every
    optimiser step; read and write checkpoints through `state_dict` / `load_state_dict`;
    save the models inside `with fp32_models():`, or `release()` them when training is over.
    With `enabled=False` (fp32 training) every one of these is what plain training does, so a
    training loop calls them unconditionally.
    """

    def __init__(self, models: list[torch.nn.Module], enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
        self.models = models
        # Per model: (name in its state dict, the model's bf16 weight, the fp32 master).
        self.entries: list[list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]] = []
        self.master_of: dict[int, torch.nn.Parameter] = {}  # id(model weight) -> master
        # Gradient buffers that outlive the optimiser's zero_grad(set_to_none=True): a fresh 4 MB
        # fp32 gradient per weight per backward cost page faults every time.
        self.grad_buffers: dict[int, torch.Tensor] = {}  # id(master) -> buffer
        with torch.no_grad():
            for model in models:
                entries = []
                for name, weight in (matmul_weights(model) if enabled else []):
                    if not weight.requires_grad:
                        continue
                    master = torch.nn.Parameter(weight.detach().clone())
                    weight.data = weight.data.to(dtype)
                    entries.append((name, weight, master))
                    self.master_of[id(weight)] = master
                self.entries.append(entries)

    def _all(self) -> Iterator[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
        for entries in self.entries:
            yield from entries

    def optimizer_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The model's trainable parameters, each bf16 matmul weight replaced by its fp32 master."""
        return [self.master_of.get(id(p), p) for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Move the bf16 weight gradients of the last backward into the masters' fp32 gradients.

        A master without a gradient (the optimiser's zero_grad dropped it) starts from this
        backward's; one with a gradient adds to it, in fp32, as autograd would have under
        autocast (gradient accumulation over micro-batches).
        """
        for _, weight, master in self._all():
            if weight.grad is None:
                continue
            if master.grad is None:
                buffer = self.grad_buffers.get(id(master))
                if buffer is None:
                    buffer = self.grad_buffers[id(master)] = torch.empty_like(master)
                master.grad = buffer.copy_(weight.grad)
            else:
                master.grad.add_(weight.grad)
            weight.grad = None

    @torch.no_grad()
    def copy_masters_to_models(self) -> None:
        """Round the stepped fp32 masters into the models' bf16 weights, in place."""
        for _, weight, master in self._all():
            weight.data.copy_(master)

    def state_dict(self, model_index: int) -> dict[str, torch.Tensor]:
        """Model `model_index`'s state dict with the fp32 masters in place of its bf16 weights."""
        state = self.models[model_index].state_dict()
        for name, _, master in self.entries[model_index]:
            state[name] = master.detach()
        return state

    @torch.no_grad()
    def load_state_dict(self, model_index: int, state: dict[str, torch.Tensor]) -> None:
        self.models[model_index].load_state_dict(state)  # rounds the fp32 weights into the bf16 ones
        for name, weight, master in self.entries[model_index]:
            master.copy_(state[name])
            weight.grad, master.grad = None, None

    def release(self) -> None:
        """Training is over: the models take their fp32 masters back for good."""
        for _, weight, master in self._all():
            weight.data, weight.grad = master.data, None

    @contextlib.contextmanager
    def fp32_models(self):
        """The models hold their fp32 masters for the duration (e.g. to save them); bf16 again after."""
        low = []
        for _, weight, master in self._all():
            low.append(weight.data)
            weight.data = master.data
        try:
            yield
        finally:
            for (_, weight, _), data in zip(self._all(), low):
                weight.data = data
