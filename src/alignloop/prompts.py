"""Turning prompts and responses into token ids, the same way in every stage.

The prompt goes through the model's own chat template (stored in its tokenizer),
so SFT, sampling, reward scoring and PPO all see identical prompt tokens. The
response is tokenised on its own and ends with EOS: this is exactly what the
model produces at generation time, so training and sampling agree token for token.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .errors import InputError
from .jsonl import read_records


# Tokens of prompt + response the training stages (SFT, reward model) keep by default: a quotation
# and its prompt, or a chat turn; a model with a shorter context caps it at its context.
DEFAULT_MAX_LENGTH = 192


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return (tokenizer.bos_token or "") + prompt


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    # add_special_tokens=False: the template already placed BOS where the model expects it.
    return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right padding for training and scoring."""
    width = max(len(s) for s in sequences)
    ids = [s + [pad_id] * (width - len(s)) for s in sequences]
    mask = [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
    return ids, mask


def prompt_files(path: Path) -> list[Path]:
    """A prompts file, or each `*.jsonl` file of a directory of them in name order (prompts gathered
    from several sources, e.g. `realdata.write_prompt_split`); a `datasets` directory is one source."""
    path = Path(path)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise InputError(path, "a directory of prompts needs *.jsonl files in it")
        return files
    return [path]


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """The distinct non-empty prompts of a `{"prompt": ...}` file, in file order; the first `limit`.

    A directory of them (`prompt_files`) is read round-robin, one prompt of each file in turn, so
    that the first `limit` draw on every source, not only on the first file."""
    sources = [read_records(file, required={"prompt": str}) for file in prompt_files(path)]
    rows = [source[i] for i in range(max(map(len, sources))) for source in sources if i < len(source)]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows if r["prompt"].strip()))
    if not prompts:
        raise InputError(path, "no non-empty prompts")
    return prompts[:limit] if limit else prompts
