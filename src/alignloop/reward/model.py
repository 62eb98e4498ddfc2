"""The reward model as a standard `AutoModelForSequenceClassification` directory plus its normalisation.

The score of a (prompt, response) is the scalar head's output at the last
non-pad token of `prompt + response + EOS`, i.e. at the EOS: the transformer
has read the whole response there. `reward_normalization.json` holds a gain
and bias chosen after training so that scores of responses sampled from the
reference (SFT) policy have mean 0 and std 1 (as in OpenAI's lm-human-preferences):
PPO's KL coefficient then means the same thing whatever the RM's raw scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from ..device import autocast
from ..errors import InputError
from ..files import atomic_directory, atomic_write_json
from ..modeling import (check_model_dir, load_scalar_model, load_tokenizer, read_json_file, replaced_by_a_save,
                        use_fast_kernels)
from ..prompts import encode_prompt, encode_response, pad_right

NORMALIZATION_FILE = "reward_normalization.json"


def init_reward_model(backbone_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Backbone weights from a causal LM directory, a fresh (num_labels=1) scalar head, dropout off."""
    backbone_dir = check_model_dir(backbone_dir)
    tokenizer = tokenizer or load_tokenizer(backbone_dir)
    config = AutoConfig.from_pretrained(backbone_dir, num_labels=1)
    for key, value in config.to_dict().items():
        # Dropout off for good, in the saved config too: scores must be deterministic, and the
        # PPO critic initialised from this directory inherits the setting.
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    model = AutoModelForSequenceClassification.from_pretrained(backbone_dir, config=config, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # the head finds the last non-pad token with it
    return use_fast_kernels(model).eval()


class RewardModel:
    """A loaded reward model: scores token ids (for PPO) or text (for everything else)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gain: float = 1.0,
                 bias: float = 0.0, precision: str = "fp32"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.gain = gain
        self.bias = bias
        self.precision = precision

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu", precision: str = "fp32") -> "RewardModel":
        path = check_model_dir(path)
        tokenizer = load_tokenizer(path)
        model = load_scalar_model(path).to(device)
        norm = read_normalization(path / NORMALIZATION_FILE)
        for p in model.parameters():
            p.requires_grad_(False)  # frozen during PPO
        return cls(model, tokenizer, norm["gain"], norm["bias"], precision)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """The model, tokenizer and normalisation, swapped into `out_dir` together (see `save_model_dir`)."""
        out_dir = Path(out_dir)
        with atomic_directory(out_dir, replaces=replaced_by_a_save) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / NORMALIZATION_FILE, {"gain": self.gain, "bias": self.bias})
        return out_dir

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(batch,) fp32 scores of right-padded `prompt + response + EOS` token ids."""
        with autocast(self.device, self.precision):
            raw = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        raw = raw.float()
        return self.normalize(raw) if normalize else raw

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head outputs -> rewards with mean 0, std 1 on the reference policy's samples."""
        return self.gain * raw + self.bias

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64, normalize: bool = True) -> list[float]:
        """Scores of text pairs, batched by length so padding stays small.

        Each distinct (prompt, response) is scored once: in preference data a sentence sits in
        several pairs, and a policy's samples repeat.
        """
        pairs = list(zip(prompts, responses))
        unique = list(dict.fromkeys(pairs))
        if len(unique) < len(pairs):
            values = dict(zip(unique, self.score([p for p, _ in unique], [r for _, r in unique], batch_size, normalize)))
            return [values[pair] for pair in pairs]
        seqs = [encode_prompt(self.tokenizer, p) + encode_response(self.tokenizer, r) for p, r in pairs]
        limit = getattr(self.model.config, "n_positions", None) or getattr(self.model.config, "max_position_embeddings", None)
        if limit:
            # Longer than the model's context: keep the end, where the response and the EOS we score are.
            seqs = [s[-limit:] for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_right([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            scores = self.score_ids(torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device), normalize)
            for i, s in zip(idx, scores.tolist()):
                out[i] = s
        return out


def read_normalization(path: Path) -> dict[str, float]:
    """The gain and bias of `path` (identity when the model has none); refuses anything but two finite numbers."""
    if not path.is_file():
        return {"gain": 1.0, "bias": 0.0}
    norm = read_json_file(path)
    if not isinstance(norm, dict):
        raise InputError(path, "expected a JSON object with 'gain' and 'bias'")
    for key in ("gain", "bias"):
        value = norm.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(path, f"expected a finite number, got {value!r}: retrain or re-save the reward model",
                             field=key)
    return {"gain": float(norm["gain"]), "bias": float(norm["bias"])}
