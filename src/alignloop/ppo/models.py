"""The models of an RLHF run, by role, and the forward passes each role is used for.

    policy     trained; under LoRA it carries the adapters
    reference  frozen copy of the starting policy (None under LoRA: the policy with adapters off)
    critic     a separate scalar model (initialised from the RM or `value_model`), or
    value_head a scalar head on the policy's last hidden state (shares the policy's trunk)
    reward     the frozen reward model

Every log-prob, value and score comes out in fp32; only matmuls run in the chosen precision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import fsdp
from ..device import autocast
from ..fsdp import FSDPSettings
from ..logprobs import token_logprobs
from ..mixed_precision import MasterWeights, cast_frozen_matmul_weights, matmul_weights
from ..modeling import check_same_tokenizer, disable_dropout, load_causal_lm, load_scalar_model, load_tokenizer
from ..reward.model import RewardModel
from ..rollout import ScalarHeadForward, TokenBatch, response_logits, response_positions, sequence_scores
from .config import PPOConfig


class ValueHead(torch.nn.Module):
    """A scalar head on the policy's last hidden state: the cheap critic that shares the policy trunk."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)  # V = 0 at the start; critic warm-up fits it
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.float()).squeeze(-1)


@dataclass
class RLModels:
    policy: PreTrainedModel
    reference: PreTrainedModel | None
    critic: PreTrainedModel | None
    value_head: ValueHead | None
    reward: RewardModel
    tokenizer: PreTrainedTokenizerBase
    masters: MasterWeights  # fp32 masters of the bf16 policy (and separate critic); disabled in fp32
    precision: str
    temperature: float
    uses_reference: bool = True  # False: no KL term anywhere, so no reference forward (and no copy of it)
    gold: RewardModel | None = None  # a held-out RM the run is judged by, never trained against
    critic_forward: ScalarHeadForward | None = None  # the separate critic's forward (its FSDP root when sharded)
    reward_forward: ScalarHeadForward | None = None  # the reward model's forward (its root when sharded)
    gold_forward: ScalarHeadForward | None = None
    sharded: bool = False  # every model is sharded over the processes (shard_models)
    unsharded_classes: dict[str, type] | None = None  # sharded: each trained role's class before sharding

    @property
    def critic_module(self) -> torch.nn.Module | None:
        """The learnt value function (a model or a head); None for the critic-free algorithms."""
        return self.critic if self.critic is not None else self.value_head

    def trained(self) -> dict[str, torch.nn.Module]:
        """The trained modules by role: what a checkpoint holds."""
        critic = {"critic": self.critic_module} if self.critic_module is not None else {}
        return {"policy": self.policy, **critic}

    # -- forwards ----------------------------------------------------------------------------------
    def policy_logprobs(self, batch: TokenBatch, with_hidden: bool = False):
        """log pi(response token) at the sampling temperature: (B, R) fp32; the logits; the trunk's states."""
        if with_hidden:  # the value head reads the policy's last hidden state: one forward for both
            positions = response_positions(batch)
            with autocast(batch.input_ids.device, self.precision):
                out = self.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, logits_to_keep=positions,
                                  output_hidden_states=True, use_cache=False)
            logits, hidden = out.logits, out.hidden_states[-1][:, positions]
        else:
            logits, hidden = response_logits(self.policy, batch, self.precision), None
        return token_logprobs(logits, batch.responses, self.temperature), logits, hidden

    def policy_and_values(self, batch: TokenBatch):
        """(log-probs, logits, values): the policy forward and the critic's, sharing the trunk for a value head."""
        logprobs, logits, hidden = self.policy_logprobs(batch, with_hidden=self.value_head is not None)
        return logprobs, logits, self.critic_values(batch, hidden)

    def reference_logprobs(self, batch: TokenBatch) -> torch.Tensor | None:
        """log pi_ref(response token) at the sampling temperature, or None when no KL term needs it."""
        if not self.uses_reference:
            return None
        if self.reference is not None:
            logits = response_logits(self.reference, batch, self.precision)
        else:
            with self.policy.disable_adapter():
                logits = response_logits(self.policy, batch, self.precision)
        return token_logprobs(logits, batch.responses, self.temperature)

    def critic_values(self, batch: TokenBatch, policy_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """V(s_t) for each response position t: (B, R) fp32; zeros with no critic."""
        if self.critic is not None:
            return self.critic_forward(batch.input_ids, batch.attention_mask, batch.position_ids,
                                       batch.prompt_width)[:, :-1]
        if self.value_head is not None:
            return self.value_head(policy_hidden)
        return torch.zeros(batch.responses.shape, device=batch.responses.device)

    def reward_scores(self, batch: TokenBatch, gold: bool = False) -> torch.Tensor:
        """(B,) RM scores at each response's last token, normalised by the RM's gain and bias
        (`gold`: the held-out RM's, which the policy is judged by, not paid by)."""
        reward, forward = (self.gold, self.gold_forward) if gold else (self.reward, self.reward_forward)
        heads = forward(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width)
        return reward.normalize(sequence_scores(heads, batch))


def build_models(config: PPOConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                 precision: str, sharded: bool = False) -> RLModels:
    """The run's models on `device`. `sharded`: the policy and the critic will be sharded by FSDP
    (shard_models), whose fp32 parameters are the optimiser's masters, so they keep fp32
    weights here, and so do the frozen models, which shard_models shards in the matmul dtype."""
    c = config
    policy = load_causal_lm(c.policy, device, tokenizer)
    reward = RewardModel.from_pretrained(c.reward_model, device, precision)
    # The policy's token ids go straight into the reward model and the critic: one tokenizer for all.
    check_same_tokenizer(Path(c.policy), tokenizer, Path(c.reward_model), reward.tokenizer)
    gold = None
    if c.gold_reward_model is not None:
        gold = RewardModel.from_pretrained(c.gold_reward_model, device, precision)
        check_same_tokenizer(Path(c.policy), tokenizer, Path(c.gold_reward_model), gold.tokenizer)
    if c.value_model is not None:
        check_same_tokenizer(Path(c.policy), tokenizer, Path(c.value_model), load_tokenizer(c.value_model))
    reference = None
    if c.lora_r > 0:
        from peft import LoraConfig

        # The reference is the same weights with the adapters switched off: one copy of the model in memory.
        policy = with_lora_adapters(policy, LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha,
                                                       lora_dropout=c.lora_dropout, target_modules="all-linear"))
    elif c.uses_reference:
        reference = load_causal_lm(c.policy, device, tokenizer).requires_grad_(False)
    # Dropout off for good (not just eval mode): update-time log-probs must equal rollout-time ones,
    # and gradient checkpointing only works in train mode.
    policy = disable_dropout(policy)
    critic, value_head = None, None
    if c.critic_type == "separate":
        critic = load_scalar_model(c.value_model or c.reward_model)
        critic.config.pad_token_id = tokenizer.pad_token_id
        critic = disable_dropout(critic.to(device))
    elif c.critic_type == "value_head":
        value_head = ValueHead(policy.config.hidden_size).to(device)
    # bf16: the models compute with bf16 matmul weights they hold, the optimiser steps fp32 masters
    # (mixed_precision.py: the same numbers as autocast without its per-forward weight casts and
    # per-backward gradient casts). Under LoRA the policy's frozen base holds bf16 weights as a
    # frozen model does (the fp32 adapters are cast by autocast, cheaply), and the merge at the end
    # adds the adapters to the fp32 base read again from disk (`restore_fp32_base`); a separate
    # critic trains all its weights either way.
    with_masters = ([policy] if c.lora_r == 0 else []) + ([critic] if critic is not None else [])
    masters = MasterWeights(with_masters, enabled=precision == "bf16" and not sharded)
    if precision == "bf16" and c.lora_r > 0 and not sharded:  # sharded: FSDP casts each gathered block
        cast_frozen_matmul_weights(policy, skip_trained=True)
    # Sharded, the frozen models are sharded too, in the matmul dtype (shard_models).
    if precision == "bf16" and c.lora_r == 0 and reference is not None and not sharded:
        cast_frozen_matmul_weights(reference)
    for frozen in (reward, gold):
        if frozen is not None:
            frozen.model.requires_grad_(False)
            if precision == "bf16" and not sharded:
                cast_frozen_matmul_weights(frozen.model)
    if c.gradient_checkpointing:
        for model in (policy, critic):
            if model is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.lora_r > 0:
            policy.enable_input_require_grads()
    forward = (lambda model: ScalarHeadForward(model, precision) if model is not None else None)  # noqa: E731
    return RLModels(policy, reference, critic, value_head, reward, tokenizer, masters, precision, c.temperature,
                    c.uses_reference, gold, forward(critic), forward(reward.model), forward(gold and gold.model))


def with_lora_adapters(model: PreTrainedModel, lora_config) -> PreTrainedModel:
    """`model` wrapped by peft with fresh adapters of `lora_config` (a peft `LoraConfig`)."""
    from peft import get_peft_model

    return get_peft_model(model, copy.deepcopy(lora_config))  # peft keeps the config it is given


def is_lora(policy: torch.nn.Module) -> bool:
    return hasattr(policy, "peft_config")


def shard_models(models: RLModels, settings: FSDPSettings) -> None:
    """Shard every model over the processes (FSDP2), in place, before the optimiser is built.

    Under LoRA the frozen base is sharded with the adapters (so the reference, the base with
    adapters off, is a sharded forward too) and kept in fp32, the merge's precision. The policy's
    forward is its own call; the separate critic is called through `critic_forward`,
    which runs its backbone and head apart, so that is its root; the value head is one small unit
    of its own, computed in fp32 as it is unsharded. The frozen models (the reference of a
    full-weight run, the reward model, the gold one) are sharded in the matmul dtype, each forward
    gathering one block at a time: all they hold is weights, so that is what sharding saves.
    Every process must then make the same calls of these modules (fsdp.py).
    """
    models.unsharded_classes = {role: type(module) for role, module in models.trained().items()}
    if is_lora(models.policy):  # the copies are built as the policy was: the base model, then the adapters
        models.unsharded_classes["policy"] = type(models.policy.get_base_model())
    fsdp.shard(models.policy, settings, models.precision)
    if models.critic is not None:
        fsdp.shard(models.critic, settings, models.precision, root=models.critic_forward)
    if models.value_head is not None:
        fsdp.shard_whole(models.value_head, settings)
    if models.reference is not None:
        fsdp.shard_frozen(models.reference, settings, models.precision)
    fsdp.shard_frozen(models.reward.model, settings, models.precision, root=models.reward_forward)
    if models.gold is not None:
        fsdp.shard_frozen(models.gold.model, settings, models.precision, root=models.gold_forward)
    models.sharded = True


def unsharded_policy(models: RLModels, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """A plain copy of the sharded policy on `device` holding `state` (its whole weights), built as
    the policy was: under LoRA, the base model with the same adapters."""
    base_class = models.unsharded_classes["policy"]
    if not is_lora(models.policy):
        return fsdp.unsharded_copy(models.policy, state, base_class, device)
    plain = with_lora_adapters(base_class(models.policy.config).to(device), models.policy.peft_config["default"])
    plain.load_state_dict(state)
    return plain


@torch.no_grad()
def restore_fp32_base(policy: torch.nn.Module, base_dir: Path) -> None:
    """Put the fp32 weights of `base_dir` back under a LoRA policy's bf16 frozen base, before the merge."""
    original = dict(load_causal_lm(base_dir, "cpu").named_parameters())
    for name, weight in matmul_weights(policy.get_base_model()):
        if weight.dtype != torch.float32 and not weight.requires_grad:
            weight.data = original[name.replace(".base_layer", "")].to(weight.device)


def load_initial_policy(models: RLModels, init_policy: Path, device: torch.device) -> None:
    """Start the policy from other weights (a previous round's policy) while the reference stays put."""
    if is_lora(models.policy):  # LoRA: the reference is the base with adapters off: carry the adapters
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(models.policy, load_peft_weights(str(Path(init_policy) / "adapter")))
        return
    other = load_causal_lm(init_policy, device, models.tokenizer)
    load_trained_state(models, "policy", other.state_dict())


def trained_state(models: RLModels, role: str) -> dict:
    """A trained module's weights in fp32: the masters where the module holds bf16 copies."""
    module = models.trained()[role]
    if module in models.masters.models:
        return models.masters.state_dict(models.masters.models.index(module))
    return module.state_dict()


def load_trained_state(models: RLModels, role: str, state: dict) -> None:
    """Set a trained module's weights, and its fp32 masters where it has them."""
    module = models.trained()[role]
    if module in models.masters.models:
        models.masters.load_state_dict(models.masters.models.index(module), state)
    else:
        module.load_state_dict(state)


def sharded_roots(models: RLModels) -> torch.nn.ModuleDict:
    """The sharded trained modules by role, each as the root its forwards go through."""
    critic = models.critic_forward if models.critic is not None else models.value_head
    return torch.nn.ModuleDict({"policy": models.policy, **({"critic": critic} if critic is not None else {})})


def root_prefixes(models: RLModels) -> dict[str, str]:
    """Where each role's own state-dict keys start among `sharded_roots`' keys."""
    return {"policy": "policy.", "critic": "critic.model." if models.critic is not None else "critic."}


def sharded_trained_states(models: RLModels, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """Sharded: every trained role's whole fp32 weights, and the optimiser's whole state (when given),
    as a checkpoint holds them. A collective whose result only rank 0 holds."""
    roots, prefixes = sharded_roots(models), root_prefixes(models)
    full = fsdp.full_state_dict(roots)
    weights = {role: {k[len(prefixes[role]):]: v for k, v in full.items() if k.startswith(prefixes[role])}
               for role in roots}
    return weights, (fsdp.full_optimizer_state(roots, optimizer) if optimizer is not None else {})


def load_sharded_trained_states(models: RLModels, optimizer: torch.optim.Optimizer, weights: dict,
                                optimizer_state: dict) -> None:
    """Each process takes its shard of a checkpoint's whole weights and optimiser state."""
    roots, prefixes = sharded_roots(models), root_prefixes(models)
    fsdp.load_full_state_dict(roots, {prefixes[role] + k: v for role, state in weights.items()
                                      for k, v in state.items()})
    fsdp.load_full_optimizer_state(roots, optimizer, optimizer_state)
