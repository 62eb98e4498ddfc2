"""Building, loading and saving models as standard Hugging Face directories.

Everything the toolkit writes loads with `AutoModelForCausalLM.from_pretrained`
(or `AutoModelForSequenceClassification` for the reward model) and
`AutoTokenizer.from_pretrained`, with no alignloop code.
"""

from __future__ import annotations

import fnmatch
import json
import re
import zipfile
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import ConfigError, InputError
from .files import atomic_directory
from .jsonl import decode_utf8, json_type_name


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


# Files a Hugging Face directory keeps its weights in: one file, or an index naming shards.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Any one of these holds a vocabulary; without one, transformers builds an empty tokenizer from
# the model type's defaults and generation "succeeds" with nothing.
TOKENIZER_VOCAB_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))
# What an interrupted write leaves: our writers' `*.tmp`, huggingface_hub's `*.incomplete`.
PARTIAL_SUFFIXES = (".tmp", ".incomplete", ".part")
# A transformer block's tensors are named `<prefix>.<blocks>.<index>.<...>`: GPT-2's `transformer.h.3`,
# Llama's `model.layers.3`, BERT's `encoder.layer.3`.
LAYER_INDEX = re.compile(r"\.(?:h|layers|layer|blocks)\.(\d+)\.")
# Where AutoModelForSequenceClassification keeps its output layer: `score` (GPT-2, Llama, Qwen...), `classifier` (BERT).
SCALAR_HEADS = ("score", "classifier")
SCALAR_ARCHITECTURES = ("ForSequenceClassification", "ForTokenClassification")
RESAVE_HINT = "re-save the model (save_pretrained) or rerun the stage that wrote it"


def check_model_dir(path: str | Path, tokenizer: bool = True) -> Path:
    """A complete HF model directory, checked without loading weights; else InputError saying what is wrong.

    Checks: config.json readable, a JSON object with a model_type transformers knows; weight files
    present and whole (a safetensors header is read and must cover the file; a .bin must be an
    intact zip); the tokenizer's vocabulary files (when `tokenizer`); no leftovers of an
    interrupted write. Reads a few kilobytes, so every stage can afford it up front.
    """
    path = Path(path)
    if not path.is_dir():
        partial = path.with_name(path.name + ".tmp") if path.name else None  # ".", "/" have no sibling
        if partial is not None and partial.exists():
            raise InputError(path, f"no such model directory, but {partial.name} beside it is a half-written copy: {RESAVE_HINT}")
        raise InputError(path, "no such model directory" if not path.exists() else "not a directory")
    try:
        leftovers = sorted(p.name for p in path.iterdir() if p.name.endswith(PARTIAL_SUFFIXES))
    except OSError as e:
        raise InputError(path, f"cannot list it ({e.strerror or e})") from None
    if leftovers:
        raise InputError(path, f"half-written model directory (holds {', '.join(leftovers)}): {RESAVE_HINT}, "
                               "or delete the leftover if the directory is complete")
    weights = weight_files(path)
    if not (path / "config.json").is_file():
        detail = f"has {weights[0].name} but no config.json" if weights else "no config.json"
        raise InputError(path, f"not a Hugging Face model directory ({detail}): {RESAVE_HINT}")
    config = check_model_config(path / "config.json")
    if not weights:
        raise InputError(path, f"no weight files ({' or '.join(WEIGHT_FILES)}): {RESAVE_HINT}")
    names = [check_weight_file(file) for file in weights]
    if all(n is not None for n in names):
        check_layer_count(path / "config.json", config, {name for group in names for name in group})
    if tokenizer and not has_tokenizer_files(path):
        raise InputError(path, "no tokenizer files (tokenizer.json, vocab.json + merges.txt, tokenizer.model or "
                               "vocab.txt): save the model's tokenizer into it (tokenizer.save_pretrained)")
    return path


def read_json_file(path: Path) -> object:
    """A small JSON file (config, index); unreadable, non-UTF-8 or invalid JSON raises InputError."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror or e})") from None
    try:
        return json.loads(decode_utf8(text, path))
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e.msg} at column {e.colno}): {RESAVE_HINT}", line=e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise InputError(path, f"not usable JSON ({type(e).__name__}): {RESAVE_HINT}") from None


def context_length(config: PretrainedConfig | dict) -> int | None:
    """Tokens the model attends over (GPT-2's n_positions, Llama's max_position_embeddings), if it says."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return get("n_positions") or get("max_position_embeddings")


def model_context_length(path: str | Path) -> int | None:
    """`context_length` of the model directory at `path` (its config.json, read without the weights)."""
    config = read_json_file(Path(path) / "config.json")
    return context_length(config) if isinstance(config, dict) else None


def max_length_for(model: str | Path, max_length: int | None, default: int, owner: str) -> int:
    """A training stage's token budget per item on `model`: `max_length` as given, refused when past the
    model's context, or (None) `default` capped at that context."""
    context = model_context_length(model)
    if max_length is None:
        return min(default, context or default)
    if context is not None and max_length > context:
        raise ConfigError(f"{owner}: max_length ({max_length}) is longer than {model}'s context ({context} tokens): "
                          f"set max_length <= {context}")
    return max_length


def check_model_config(config_file: Path) -> PretrainedConfig:
    config = read_json_file(config_file)
    if not isinstance(config, dict):
        raise InputError(config_file, f"expected a JSON object, got {json_type_name(config)}: {RESAVE_HINT}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise InputError(config_file, "missing: transformers needs it to pick the model class; " + RESAVE_HINT,
                         field="model_type")
    if model_type not in CONFIG_MAPPING:
        raise InputError(config_file, f"unknown model type {model_type!r} (not in this transformers)", field="model_type")
    try:  # the config class validates its fields (a string where a layer count goes); no weights are read
        return CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as e:  # transformers raises several types here; the message says which field
        raise InputError(config_file, f"transformers rejects it ({type(e).__name__}: {short_reason(e)}): {RESAVE_HINT}") from None


def check_layer_count(config_file: Path, config: PretrainedConfig, tensor_names: set[str]) -> None:
    """The config's layer count is the one the weights hold.

    More layers than weights would load with the extra ones randomly initialised (transformers only
    warns), and a huge count (1e12) would hang building the model before any weight is read.
    """
    layers = getattr(config, "num_hidden_layers", None)
    indices = {int(m.group(1)) for name in tensor_names if (m := LAYER_INDEX.search(name))}
    if not isinstance(layers, int) or not indices or layers == max(indices) + 1:
        return
    field = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")  # GPT-2: n_layer
    raise InputError(config_file, f"says {layers} layers but the weights hold {max(indices) + 1}: the config and "
                                  f"the weights come from different models; {RESAVE_HINT}", field=field)


def weight_files(path: Path) -> list[Path]:
    """The weight files the directory holds: the single file(s), or every shard its index names."""
    files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    for index_name in WEIGHT_INDEXES:
        index = path / index_name
        if not index.is_file():
            continue
        content = read_json_file(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(index, "expected an object mapping tensor names to shard files", field="weight_map")
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise InputError(index, f"names shard {shard!r}, which is missing: {RESAVE_HINT}", field="weight_map")
            files.append(path / shard)
    return files


def check_weight_file(file: Path) -> list[str] | None:
    """A safetensors file whose header parses and covers the file (its tensor names are returned),
    or a torch zip whose directory reads (names unknown without unpickling: None)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:  # memory-maps and checks the header; reads no tensor
                return list(f.keys())
        except Exception as e:  # SafetensorError, OSError: the reason goes into the message
            raise InputError(file, f"corrupt or truncated safetensors file ({e}): {RESAVE_HINT}") from None
    try:
        with zipfile.ZipFile(file) as archive:  # torch.save's format; truncation loses the central directory
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(file, f"corrupt or truncated PyTorch weights ({e}): {RESAVE_HINT}") from None
    return None


def check_has_scalar_head(path: Path) -> None:
    """A reward model or critic directory holds its one-output head; a plain LM's would be random.

    transformers initialises a missing head at random with only a warning: a policy directory
    passed as the reward model would then score every response with noise.
    """
    names = [check_weight_file(file) for file in weight_files(path)]
    if all(n is not None for n in names) and not any(
            name.split(".")[0] in SCALAR_HEADS for group in names for name in group):
        raise InputError(path, f"holds no reward/value head ({' or '.join(h + '.weight' for h in SCALAR_HEADS)}): "
                               "it is a language model; give a directory written by alignloop reward train")


def check_not_scalar_model(path: Path) -> None:
    """A policy directory is a language model, not a reward model or critic.

    transformers builds a causal LM from a sequence classifier's directory with only a warning:
    its LM head is initialised at random (or, tied to the embeddings, reads a trunk trained to
    score), so a reward model given as the policy would generate noise without a word.
    """
    config = read_json_file(path / "config.json")
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(architectures, list) and architectures and all(
            isinstance(a, str) and a.endswith(SCALAR_ARCHITECTURES) for a in architectures):
        raise InputError(path, f"is a reward model or critic ({architectures[0]}), not a language model: "
                               "give a policy, SFT or base model directory")


def has_tokenizer_files(path: Path) -> bool:
    return any(all((path / name).is_file() for name in group) for group in TOKENIZER_VOCAB_FILES)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The directory's tokenizer, with an EOS and a pad distinct from it (one is added if missing)."""
    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers/transformers raise many types for a broken file; say which and why
        raise InputError(path, f"cannot load its tokenizer ({type(e).__name__}: {short_reason(e)}): "
                               "save a working tokenizer into it") from None
    if tokenizer.eos_token_id is None:
        # Without EOS a response never ends: training cannot teach stopping and sampling cannot detect it.
        raise InputError(path, "the tokenizer has no EOS token: set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A separate pad token, so masking padding never masks the EOS (see tokenizer.py).
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def short_reason(error: BaseException) -> str:
    """A third-party error's message on one line: its first two non-blank lines, at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or "no message"


def check_tokenizer_fits(path: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding.

    The one exception is a pad token `load_tokenizer` appended: the loaders grow the embedding for it.
    A larger tokenizer is another model's: its ids would index past the embedding.
    """
    appended_pad = tokenizer.pad_token_id == len(tokenizer) - 1 and tokenizer.pad_token_id >= vocab_size
    needed = len(tokenizer) - 1 if appended_pad else len(tokenizer)
    if needed > vocab_size:
        raise InputError(path, f"the tokenizer has {needed} tokens but the model's embedding only {vocab_size}: "
                               "the tokenizer belongs to another model; use the model's own")


def check_same_tokenizer(a_dir: Path, a: PreTrainedTokenizerBase, b_dir: Path, b: PreTrainedTokenizerBase) -> None:
    """Two models that exchange token ids (policy and reward model, policy and critic) must share a tokenizer.

    Equal sizes are not enough: two BPEs trained on different text have the same size and different tokens.
    """
    if a.get_vocab() != b.get_vocab():
        only_a = len(set(a.get_vocab().items()) - set(b.get_vocab().items()))
        raise InputError(b_dir, f"its tokenizer differs from {a_dir}'s ({only_a} of {len(a)} tokens differ): "
                                "train it from the same base model so both share one tokenizer")
    for role in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(a, role) != getattr(b, role):
            raise InputError(b_dir, f"its tokenizer's {role} is {getattr(b, role)}, {a_dir}'s is {getattr(a, role)}: "
                                    "both must use one tokenizer")


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu",
                   tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Load a causal LM in fp32 (autocast picks the matmul dtype), in eval mode: dropout off."""
    path = check_model_dir(path, tokenizer=False)  # the caller brings or loads the tokenizer
    check_not_scalar_model(path)
    model = load_pretrained(AutoModelForCausalLM, path)
    if tokenizer is not None:
        fit_to_tokenizer(path, model, tokenizer)
    return use_fast_kernels(model).to(device).eval()


def load_scalar_model(path: str | Path) -> PreTrainedModel:
    """A sequence classifier with one output (a reward model or critic directory), fp32, fast kernels.

    The directory's own tokenizer (as `load_tokenizer` gives it) sets the embedding size and pad id,
    so a pad token added at load time has its row here as in the causal LM.
    """
    path = check_model_dir(path)
    check_has_scalar_head(path)
    model = load_pretrained(AutoModelForSequenceClassification, path, num_labels=1)
    fit_to_tokenizer(path, model, load_tokenizer(path))
    return use_fast_kernels(model)


def load_pretrained(auto_class: type, path: Path, **kwargs) -> PreTrainedModel:
    """`from_pretrained` in fp32, with a failure the checks above did not foresee named by directory."""
    try:
        return auto_class.from_pretrained(path, dtype=torch.float32, **kwargs)
    except Exception as e:  # whatever transformers raises for a directory it cannot build a model from
        # Its size-mismatch error points at a report it does not print: say what it means.
        reason = ("the weights' shapes do not match config.json" if "mismatched_sizes" in str(e)
                  else f"{type(e).__name__}: {short_reason(e)}")
        raise InputError(path, f"cannot load the model ({reason}): {RESAVE_HINT}") from None


def fit_to_tokenizer(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embedding for a pad token load_tokenizer added, and make the model pad with it."""
    rows = model.get_input_embeddings().num_embeddings
    check_tokenizer_fits(path, tokenizer, rows)
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


# What `save_pretrained` writes for a model and its tokenizer.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "pytorch_model*.bin", "*.bin.index.json", "tokenizer*", "vocab.*", "merges.txt", "*.model",
                       "special_tokens_map.json", "added_tokens.json", "chat_template.*")


def replaced_by_a_save(name: str) -> bool:
    """An entry of a model directory that a new save replaces: the old model's files (a shard the new save
    does not write must not stay beside it) and leftovers of an interrupted write. Anything else there
    (a stage's checkpoint, metrics, prompts) is kept."""
    return name.endswith(PARTIAL_SUFFIXES) or any(fnmatch.fnmatchcase(name, p) for p in MODEL_FILE_PATTERNS)


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                   max_new_tokens: int | None = None) -> Path:
    """Weights as safetensors, tokenizer, and a generation config that stops at EOS and pads with pad.

    Written whole to `<out_dir>.tmp-XXXX`, fsynced, then renamed into place (`files.atomic_directory`):
    a reader, or a rerun after a kill, finds the old model or the new one, never half of one.
    """
    out_dir = Path(out_dir)
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
    with atomic_directory(out_dir, replaces=replaced_by_a_save) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
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
