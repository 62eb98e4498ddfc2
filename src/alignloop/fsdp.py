"""Sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for the training stages.

Under DDP every process holds the whole model, its gradients and its Adam state (20 bytes per
parameter under bf16). Under FSDP each process holds 1/N of them: every transformer block is
sharded on its own, gathered for its forward and backward and freed again, and the gradients are
reduce-scattered so that each process steps only its shard. That is ZeRO-3 (`reshard_after_forward:
true`) or, keeping the gathered weights from the forward to the backward, ZeRO-2.

Launched by accelerate with an FSDP config (examples/accelerate/fsdp.yaml), which sets
`ACCELERATE_USE_FSDP` and the `FSDP_*` variables that `settings_from_environment` reads.

Who owns what: under FSDP the engine owns the parameters. The sharded fp32 parameters ARE the
optimiser's masters, and FSDP's mixed precision (`param_dtype` bf16, gradients reduced in fp32)
replaces alignloop's own bf16-weights-with-fp32-masters scheme (mixed_precision.py). One difference
in numbers follows: FSDP casts every parameter of a block to bf16, embeddings and norms included,
where alignloop's scheme keeps those in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import ConfigError

TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (ZeRO-3); False: ZeRO-2
    offload_params: bool = False  # keep the shards (and Adam's state) in CPU memory between uses
    block_classes: tuple[str, ...] = ()  # module classes sharded on their own; empty: the model's `_no_split_modules`


def settings_from_environment(environ: Mapping[str, str]) -> FSDPSettings | None:
    """The FSDP settings accelerate launch passed (None when it did not ask for FSDP)."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() not in TRUE:
        return None
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"the accelerate config asks for FSDP version {version}: alignloop shards with FSDP2 "
                          "(torch's fully_shard); set `fsdp_version: 2` in its fsdp_config "
                          "(examples/accelerate/fsdp.yaml)")
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").upper()
    # accelerate passes FSDP1's strategy names here too; FSDP2 knows only "reshard or not".
    if reshard not in ("TRUE", "FALSE", "1", "0", "FULL_SHARD", "SHARD_GRAD_OP"):
        raise ConfigError(f"fsdp_reshard_after_forward: expected true or false, got '{reshard.lower()}'")
    blocks = tuple(c.strip() for c in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return FSDPSettings(reshard_after_forward=reshard in ("TRUE", "1", "FULL_SHARD"),
                        offload_params=environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in TRUE,
                        block_classes=blocks)


def blocks_to_shard(model: torch.nn.Module, settings: FSDPSettings) -> list[torch.nn.Module]:
    """The model's transformer blocks: each becomes one FSDP unit (gathered and freed as a whole)."""
    names = set(settings.block_classes or getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"FSDP: no module of class {', '.join(sorted(names)) or '(none named)'} in "
                          f"{type(model).__name__}; name the transformer block class in the accelerate config's "
                          "fsdp_transformer_layer_cls_to_wrap")
    return blocks


def shard(model: torch.nn.Module, settings: FSDPSettings, precision: str, root: torch.nn.Module | None = None) -> None:
    """Shard `model` in place over the default process group: each block, then the rest (embeddings,
    norms, head) as the unit of `root`, the module whose forward the training calls (default: the model;
    a wrapper whose forward runs the model's parts one by one must be the root, so that its call gathers
    them all)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # Gradients are reduced in fp32 whatever the compute dtype: the sum over processes keeps its bits.
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                 reduce_dtype=torch.float32)
    # The root unit (embeddings, final norm, head) is needed again at once by the backward.
    shard_blocks_and_root(model, root, settings, mixed, settings.reshard_after_forward, reshard_root=False)


def shard_frozen(model: torch.nn.Module, settings: FSDPSettings, precision: str,
                 root: torch.nn.Module | None = None) -> None:
    """Shard a model that takes no gradient as `shard` does, its shards held in the compute dtype
    (bf16 halves them; a frozen model needs no fp32 masters), so each forward gathers them as they are."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        model.to(torch.bfloat16)
    # With no backward to come, every unit's weights are freed after its forward, the root's too.
    shard_blocks_and_root(model, root, settings, MixedPrecisionPolicy(), reshard_blocks=True, reshard_root=True)


def shard_blocks_and_root(model: torch.nn.Module, root: torch.nn.Module | None, settings: FSDPSettings, mixed,
                          reshard_blocks: bool, reshard_root: bool) -> None:
    """`fully_shard` each of the model's blocks, then the rest as the unit of `root` (default: the model)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks_to_shard(model, settings):
        fully_shard(block, reshard_after_forward=reshard_blocks, mp_policy=mixed,
                    offload_policy=offload_policy(settings))
    fully_shard(root if root is not None else model, reshard_after_forward=reshard_root, mp_policy=mixed,
                offload_policy=offload_policy(settings))


def shard_whole(module: torch.nn.Module, settings: FSDPSettings) -> None:
    """Shard a small module with no blocks (a value head) as one unit that computes in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fully_shard(module, reshard_after_forward=False, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
                offload_policy=offload_policy(settings))


def offload_policy(settings: FSDPSettings):
    """Shards (and Adam's state) in CPU memory between uses when the config asks, else on the device."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return CPUOffloadPolicy() if settings.offload_params else OffloadPolicy()


def full_state_dict(model: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The sharded model's whole state dict on the CPU, in rank 0 only (`everywhere`: in every process).

    A collective: every process must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    return {k: v.cpu() for k, v in state.items()} if everywhere else state


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (held by every process) into the sharded model: each takes its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's whole state (keyed by parameter name) on the CPU in rank 0; a collective.

    Empty before the first step: torch would fill an empty state by stepping every parameter with
    a zero gradient at lr 0, which Adam counts as its first step, so the run's real first step would
    be taken with the second step's bias correction (a PPO run checkpoints before its first step).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not optimizer.state:
        return {}
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state:  # written before the first step (full_optimizer_state): the optimiser starts afresh
        optimizer.state.clear()
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(model: torch.nn.Module, state: dict[str, torch.Tensor], model_class: type,
                   device: torch.device) -> torch.nn.Module:
    """A plain (unsharded, fp32) `model_class` on `device` holding `state`, the sharded model's whole
    state dict (`full_state_dict(..., everywhere=True)`).

    `fully_shard` changes a module in place (its class, its hooks, DTensor parameters), so the
    stage's later forwards (held-out perplexity, sharded unevenly over the processes) and its save
    get a fresh model built from the same config (which also computes the buffers a state dict
    does not hold, such as rotary frequencies) with the gathered weights loaded.
    """
    plain = model_class(model.config).to(device)
    plain.load_state_dict(state)
    return plain
