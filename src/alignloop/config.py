"""Configs are plain dataclasses: loaded from YAML, overridden by `key=value`, validated, saved.

Every stage defines one `@dataclass` subclassing `StageConfig` and checks itself
in `validate()` (called from `__post_init__`), so a config that cannot work fails
in the first second, with a sentence naming the key and what to change.

Before `validate()` runs, every field is checked against its declared type (an int is
a whole number and not `true`, a float is finite, a path or text is at most
MAX_TEXT_CHARS characters with no NUL) and against the size caps in `FIELD_LIMITS`
(by field name, for every stage) and the class's own `LIMITS`, so an absurd value
(`batch_size: 1e12`, `max_new_tokens: 10**9`) is refused before anything allocates.
A problem in a YAML file is one line naming the file, the line and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Iterator, TypeVar

import yaml

from .errors import AlignloopError, ConfigError, InputError
from .files import atomic_write_text

C = TypeVar("C", bound="StageConfig")

MAX_BATCH = 65_536  # sequences (or items) in one batch
MAX_TOKENS = 131_072  # tokens of one sequence: 128 k, the longest context of current open models
MAX_SEED = 2**62  # torch's generator takes a signed 64-bit seed; rounds, retries and rollbacks add offsets
MAX_INT = 2**63 - 1  # no whole number in a config is larger: past it torch and SQLite overflow
MAX_TEXT_CHARS = 4096  # a path (Linux's PATH_MAX) or any other text value
MAX_NAME_BYTES = 255  # one file or directory name (NAME_MAX)
MAX_LIST_ITEMS = 1000
MAX_CONFIG_BYTES = 2**20  # a YAML config (the largest shipped is ~2 kB): a bigger file is not a config

# (lowest, highest) allowed, by field name in any stage's config. The lowest bounds of sizes are the
# stages' own validate() checks, with their reasons; these caps stop a typo or unit slip from
# exhausting memory or time before the run starts. Each is far above what real runs use.
FIELD_LIMITS: dict[str, tuple[int | float | None, int | float]] = {
    **dict.fromkeys(("batch_size", "mini_batch_size", "eval_batch_size", "gradient_accumulation_steps",
                     "samples_per_prompt"), (None, MAX_BATCH)),
    **dict.fromkeys(("max_new_tokens", "normalize_max_new_tokens", "max_length", "pack_width", "block_size"),
                    (None, MAX_TOKENS)),
    "steps": (None, 10_000_000),
    "epochs": (None, 100_000),
    "ppo_epochs": (None, 10_000),
    "num_prompts": (None, 100_000_000),
    "normalize_samples": (None, 10_000_000),
    "num_examples": (None, 100_000),
    "max_resample": (None, 1_000),
    "annotators": (None, 10_000),
    "overlap": (None, 100),  # the annotation service's own limit
    "lora_r": (None, 65_536),
    "bins": (None, 100_000),
    "seed": (-MAX_SEED, MAX_SEED),
    "port": (0, 65_535),  # 0: any free port
}



def device_problem(name: str) -> str | None:
    """Why `name` is no torch device ('auto', 'cpu', 'cuda', 'cuda:1', 'mps', ...), or None."""
    if name == "auto":
        return None
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"expected auto, cpu, cuda, cuda:N or another torch device, got {shown(name)}"
    return None


def precision_problem(name: str) -> str | None:
    return None if name in ("auto", "fp32", "bf16") else f"expected auto, fp32 or bf16, got {shown(name)}"


# Checks of values by field name in any stage's config, after the type check: the reason a value cannot work, or None.
FIELD_RULES: dict[str, typing.Callable[[Any], str | None]] = {"device": device_problem, "precision": precision_problem}

_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 60
_shown.maxlevel, _shown.maxlist, _shown.maxdict = 2, 4, 4


def shown(value: Any) -> str:
    """A short, one-line rendering of any value for a message: bounded whatever its size or depth
    (an input is never echoed whole), with line breaks and lone surrogates escaped."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(abs(value))) if value.bit_length() < 10_000 else 'over 3000'} digits"
    return _shown.repr(value)


class FieldError(ConfigError):
    """A config value that cannot work, with the field it is about (when known), so a YAML file's line can be named."""

    def __init__(self, owner: str, field: str | None, reason: str, typed: bool = False, message: str | None = None):
        self.owner, self.field, self.reason = owner, field, reason
        super().__init__(message or (f"{owner}.{field}: {reason}" if typed else f"{owner}: {reason}"))


@dataclasses.dataclass
class StageConfig:
    # Keys that were renamed: old name -> new name. A file or --set with the old name still works,
    # with a note on stderr, so configs written for an earlier version keep running.
    RENAMED: ClassVar[dict[str, str]] = {}
    # The class's own (lowest, highest) per field, over FIELD_LIMITS.
    LIMITS: ClassVar[dict[str, tuple[int | float | None, int | float]]] = {}

    def __post_init__(self) -> None:
        self._check_fields()
        self.validate()

    def validate(self) -> None:
        """Subclasses raise ConfigError for anything that cannot work."""

    # -- construction ---------------------------------------------------
    @classmethod
    def known_keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init} | set(cls.RENAMED)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], source: str | None = "config",
                  key_lines: dict[str, int] | None = None, overridden: dict[str, str] | None = None) -> C:
        """The config from `values` read from `source` (a file, a pipeline section; None: the caller's own
        keywords). Any problem is one line naming `source`, and the key's line when `key_lines` has it;
        a key in `overridden` came from there instead (`--set k`, a command-line flag)."""
        key_lines, overridden = dict(key_lines or {}), dict(overridden or {})
        known = cls.known_keys()
        unknown = sorted((k for k in values if k not in known), key=str)
        if unknown:
            key = unknown[0]
            message = f"unknown key for {cls.__name__}; known keys: {', '.join(sorted(known))}"
            if key in key_lines:  # it came from the YAML file: name file, line and key
                raise InputError(source, message, line=key_lines[key], field=key)
            where = overridden.get(key, source)
            raise ConfigError(f"{where + ': ' if where else ''}unknown key {shown(key)} ({message})")
        values = dict(values)
        for old, new in cls.RENAMED.items():
            if old in values:
                print(f"[alignloop] {source}: '{old}' is now called '{new}'; please rename it", file=sys.stderr)
                values.setdefault(new, values.pop(old))
                for where in (key_lines, overridden):
                    if old in where:
                        where[new] = where.pop(old)
        try:
            return cls(**values)
        except AlignloopError as e:
            raise located(e, cls._field_naming(values, e), source, key_lines, overridden) from None
        except OSError as e:  # a path the OS refuses to look up (a text field used as a path, say)
            raise ConfigError(f"{source + ': ' if source else ''}cannot use {shown(e.filename)} "
                              f"({e.strerror or e})") from None
        except TypeError as e:  # e.g. a wrong type the coercion could not fix
            raise ConfigError(f"{source + ': ' if source else ''}{e}") from None

    @classmethod
    def check_values(cls, values: dict[str, Any], source: str, key_lines: dict[str, int] | None = None,
                     prefix: str = "") -> None:
        """The type and size checks of `values` (known keys only), without building the config: for a
        pipeline section, checked before any stage runs (its paths may not exist yet). `prefix`
        ('ppo.') is how the section's keys appear in `key_lines`."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        limits = cls.limits()
        for key, value in values.items():
            name = cls.RENAMED.get(key, key)
            if name not in fields or name not in hints:
                continue
            try:
                check_field(cls.__name__, name, hints[name], value, limits.get(name))
            except FieldError as e:
                line = (key_lines or {}).get(prefix + key)
                if line is not None:
                    raise InputError(source, e.reason, line=line, field=prefix + key) from None
                raise ConfigError(f"{source}: {prefix}{key}: {e.reason}") from None

    @classmethod
    def limits(cls) -> dict[str, tuple[int | float | None, int | float]]:
        return {**FIELD_LIMITS, **cls.LIMITS}

    @classmethod
    def _field_naming(cls, values: dict[str, Any], error: AlignloopError) -> str | None:
        """The field `error` is about: its own, or the field whose path is the file (or the nearest
        directory holding the file) an InputError names."""
        if getattr(error, "field", None) is not None and not isinstance(error, InputError):
            return error.field
        if not isinstance(error, InputError):
            return None
        target = Path(error.path)
        holders = [(len(Path(v).parts), name) for name, v in values.items() if isinstance(v, (str, Path))
                   and (target == Path(v) or (str(v) not in ("", ".") and Path(v) in target.parents))]
        return max(holders)[1] if holders else None

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, **kwargs: Any) -> C:
        """YAML file (optional), then `key=value` overrides, then keyword arguments (a command's flags)."""
        values: dict[str, Any] = {}
        key_lines: dict[str, int] = {}
        if path is not None:
            values, key_lines = read_yaml_mapping(path)
        overridden: dict[str, str] = {}
        for item in overrides or []:
            (key,), value = parse_set(item, parts=1)
            values[key] = value
            overridden[key] = f"--set {shown(key)[1:-1]}"
        for key, value in kwargs.items():
            if value is not None:
                values[key] = value
                overridden[key] = f"--{key.replace('_', '-')}"
        for key in overridden:
            key_lines.pop(key, None)  # no longer the file's line
        return cls.from_dict(values, source=None if path is None else str(path), key_lines=key_lines,
                             overridden=overridden)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out

    def save(self, directory: str | Path, name: str | None = None) -> Path:
        """Write the config beside the stage's outputs, so every run says how it was made."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / (name or f"alignloop_{type(self).__name__.lower()}.yaml")
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    # -- helpers ----------------------------------------------------------
    def _check_fields(self) -> None:
        """Each field against its declared type and its limits; YAML's obvious mismatches (`1e-4` read as
        a string, an int where a float is meant, a string where a path is) are converted."""
        hints = typing.get_type_hints(type(self))
        limits = self.limits()
        for f in dataclasses.fields(self):
            if f.name in hints:
                setattr(self, f.name, check_field(type(self).__name__, f.name, hints[f.name], getattr(self, f.name),
                                                  limits.get(f.name)))

    @contextlib.contextmanager
    def about(self, field: str) -> Iterator[None]:
        """An error raised inside (a label function that does not load, say) is about `field`, so a YAML
        file's line for it can be named. An InputError keeps the path it names."""
        try:
            yield
        except (FieldError, InputError):
            raise
        except AlignloopError as e:
            raise FieldError(type(self).__name__, field, str(e), message=str(e)) from None

    def require(self, condition: bool, message: str, field: str | None = None) -> None:
        """Raise a FieldError with `message` unless `condition`. Its field is `field`, else the message's
        first word when that is a field name ("k must be >= 2"), so a YAML file's line can be named."""
        if not condition:
            if field is None:
                first = re.match(r"[A-Za-z_]\w*", message)
                names = {f.name for f in dataclasses.fields(self)}
                field = first.group(0) if first and first.group(0) in names else None
            raise FieldError(type(self).__name__, field, message)


def located(error: AlignloopError, field: str | None, source: str | None, key_lines: dict[str, int],
            overridden: dict[str, str]) -> AlignloopError:
    """`error`, raised while building a config whose `field` it is about (None: unknown), as one line
    that says where the value came from: the file and its line, `--set field`, or at least the file."""
    reason = error.reason if isinstance(error, FieldError) else str(error)
    if field in overridden:
        return ConfigError(f"{overridden[field]}: {reason}")
    if source is not None and field in key_lines:
        return InputError(source, reason, line=key_lines[field], field=field)
    if source is None:
        return error
    return InputError(source, str(error)) if isinstance(error, InputError) else ConfigError(f"{source}: {error}")


def check_field(owner: str, name: str, hint: Any, value: Any, limit: tuple | None = None) -> Any:
    """`value` as the type `hint` declares (FieldError when it cannot be), within `limit` = (lowest, highest)."""
    def refuse(reason: str) -> typing.NoReturn:
        raise FieldError(owner, name, reason, typed=True)

    optional = _is_optional(hint)
    target = _plain_type(hint)
    if value is None:
        if optional or target is None:
            return None
        refuse(f"expected {_kind(target)}, got null")
    if target is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                refuse(f"expected a number, got {shown(value)}")
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                refuse(f"expected a finite number, got {shown(value)}")
        if not isinstance(value, float):
            refuse(f"expected a number, got {shown(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            refuse(f"expected a finite number, got {value}")
    elif target is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                refuse(f"expected a whole number, got {shown(value)}")
        if isinstance(value, bool) or not isinstance(value, int):
            refuse(f"expected a whole number, got {shown(value)}")
        if abs(value) > MAX_INT:
            refuse(f"must be at most {MAX_INT} in size, got {shown(value)}")
    elif target is bool:
        if not isinstance(value, bool):
            refuse(f"expected true or false, got {shown(value)}")
    elif target in (str, Path):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            refuse(f"expected {_kind(target)}, got {shown(value)}")
        check_text(owner, name, value, is_path=target is Path)
        value = Path(value) if target is Path else value
    elif typing.get_origin(target) is list:
        (item_hint,) = typing.get_args(target) or (None,)
        if not isinstance(value, list):
            refuse(f"expected a list, got {shown(value)}")
        if len(value) > MAX_LIST_ITEMS:
            refuse(f"at most {MAX_LIST_ITEMS} entries, got {len(value)}")
        value = [check_field(owner, name, item_hint, v) for v in value] if item_hint is not None else value
    if isinstance(value, str) and name in FIELD_RULES and (problem := FIELD_RULES[name](value)):
        refuse(problem)
    if limit is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = limit
        if value > high:
            refuse(f"at most {high:,} is allowed (a larger value would exhaust memory or time), got {shown(value)}")
        if low is not None and value < low:
            refuse(f"at least {low:,} is allowed, got {shown(value)}")
    return value


def check_text(owner: str, name: str, value: str, is_path: bool = False) -> None:
    """A text or path value: not too long, no NUL, no lone surrogate (it could not become a file name);
    a path's parts at most MAX_NAME_BYTES each (the OS refuses longer names with an error, not a 'no')."""
    def refuse(reason: str) -> typing.NoReturn:
        raise FieldError(owner, name, reason, typed=True)

    if len(value) > MAX_TEXT_CHARS:
        refuse(f"at most {MAX_TEXT_CHARS} characters, got {len(value)}")
    if "\0" in value:
        refuse("holds a NUL character")
    try:
        parts = [os.fsencode(part) for part in value.split(os.sep)]
    except UnicodeEncodeError:
        refuse(f"holds a character no file name can ({shown(value)})")
    if is_path and max(map(len, parts)) > MAX_NAME_BYTES:
        refuse(f"a file or directory name is at most {MAX_NAME_BYTES} bytes ({shown(value)})")


def _kind(target: Any) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            Path: "a path"}.get(target, "a value")


def _is_optional(hint: Any) -> bool:
    return (isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union) and \
        type(None) in typing.get_args(hint)


def _plain_type(hint: Any) -> Any:
    """`Path | None` -> Path; `float` -> float."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return hint


def read_yaml_mapping(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping at the top of a YAML file, and the 1-based line of each key.

    Keys one level down (a pipeline file's `section: {key: ...}`) are listed as `section.key`.
    This is the one YAML reader of every config, so every config error names the same lines.
    """
    path = Path(path)
    try:
        size = path.stat().st_size if path.is_file() else None
    except (OSError, ValueError):
        size = None
    if size is None:
        what = ("a directory, not a config file" if path.is_dir() else
                "not a regular file (a config is a YAML file)" if path.exists() else "no such config file")
        raise InputError(path, what)
    if size > MAX_CONFIG_BYTES:
        raise InputError(path, f"{size:,} bytes: a config file is at most {MAX_CONFIG_BYTES:,} (is it the right file?)")
    try:
        text = path.read_text(encoding="utf-8")
        data = parse_yaml(text)
        node = yaml.compose(text)
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    except YAMLProblem as e:
        raise InputError(path, f"not valid YAML ({e.reason})", line=e.line) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise InputError(path, "expected a mapping of key: value at the top level")
    key_lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.tag == MERGE_TAG:  # `<<: *defaults`: the merged keys have no line of their own
                continue
            if not isinstance(key.value, str) or key.tag != STR_TAG:
                raise InputError(path, f"a key must be a name, not {shown(key.value)}", line=key.start_mark.line + 1)
            key_lines[key.value] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for inner, _ in value.value:
                    key_lines[f"{key.value}.{inner.value}"] = inner.start_mark.line + 1
    return data, key_lines


STR_TAG, MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


class YAMLProblem(Exception):
    def __init__(self, reason: str, line: int | None = None):
        self.reason, self.line = reason, line


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, with every way it fails as one YAMLProblem (the reason and 1-based line when known):
    invalid YAML, nesting deeper than the parser recurses, an integer of more digits than Python converts."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise YAMLProblem(str(getattr(e, "problem", None) or e), None if mark is None else mark.line + 1) from None
    except RecursionError:
        raise YAMLProblem("nested too deeply") from None
    except ValueError:  # int() of a number with more than sys.get_int_max_str_digits() digits
        raise YAMLProblem(f"a number of more than {sys.get_int_max_str_digits()} digits") from None


def parse_set(item: str, parts: int) -> tuple[list[str], Any]:
    """`--set key=value` (parts=1) or `--set section.key=value` (parts=2): the key's parts and the YAML value."""
    key, sep, raw = item.partition("=")
    names = key.strip().split(".", parts - 1) if parts > 1 else [key.strip()]
    if not sep or len(names) != parts or not all(n.strip() for n in names):
        form = "key=value" if parts == 1 else "section.key=value (e.g. ppo.steps=50)"
        raise ConfigError(f"--set {shown(item)} is not of the form {form}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except YAMLProblem as e:
        raise ConfigError(f"--set {shown(item)}: the value is not valid YAML ({e.reason})") from None
    return [n.strip() for n in names], value
