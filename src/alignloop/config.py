"""Configs are plain dataclasses: loaded from YAML, overridden by `key=value`, validated, saved.

Every stage defines one `@dataclass` subclassing `StageConfig` and checks itself
in `validate()` (called from `__post_init__`), so a config that cannot work fails
in the first second, with a sentence naming the key and what to change.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from .errors import ConfigError, InputError
from .files import atomic_write_text

C = TypeVar("C", bound="StageConfig")


@dataclasses.dataclass
class StageConfig:
    # Keys that were renamed: old name -> new name. A file or --set with the old name still works,
    # with a note on stderr, so configs written for an earlier version keep running.
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self._coerce_types()
        self.validate()

    def validate(self) -> None:
        """Subclasses raise ConfigError for anything that cannot work."""

    # -- construction ---------------------------------------------------
    @classmethod
    def known_keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init} | set(cls.RENAMED)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], source: str = "config",
                  key_lines: dict[str, int] | None = None) -> C:
        known = cls.known_keys()
        unknown = sorted(set(values) - known)
        if unknown:
            key = unknown[0]
            message = f"unknown key for {cls.__name__}; known keys: {', '.join(sorted(known))}"
            if key_lines and key in key_lines:  # it came from the YAML file: name file, line and key
                raise InputError(source, message, line=key_lines[key], field=key)
            raise ConfigError(f"{source}: unknown key '{key}' ({message})")
        values = dict(values)
        for old, new in cls.RENAMED.items():
            if old in values:
                print(f"[alignloop] {source}: '{old}' is now called '{new}'; please rename it", file=sys.stderr)
                values.setdefault(new, values.pop(old))
        try:
            return cls(**values)
        except TypeError as e:  # e.g. a wrong type the coercion could not fix
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, **kwargs: Any) -> C:
        """YAML file (optional), then `key=value` overrides, then keyword arguments."""
        values: dict[str, Any] = {}
        key_lines: dict[str, int] = {}
        source = "--set"
        if path is not None:
            values, key_lines = read_yaml_mapping(path)
            source = str(path)
        for item in overrides or []:
            (key,), value = parse_set(item, parts=1)
            values[key] = value
            key_lines.pop(key, None)  # an override is no longer the file's line
        values.update({k: v for k, v in kwargs.items() if v is not None})
        return cls.from_dict(values, source=source, key_lines=key_lines)

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
    def _coerce_types(self) -> None:
        """YAML gives `1e-4` as a string and ints where floats are meant; fix the obvious cases."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints.get(f.name)
            if value is None or hint is None:
                continue
            target = _plain_type(hint)
            if target is float and isinstance(value, (int, str)) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ConfigError(f"{type(self).__name__}.{f.name}: expected a number, got {value!r}") from None
            elif target is int and isinstance(value, str):
                try:
                    setattr(self, f.name, int(value))
                except ValueError:
                    raise ConfigError(f"{type(self).__name__}.{f.name}: expected an integer, got {value!r}") from None
            elif target is Path and isinstance(value, str):
                setattr(self, f.name, Path(value))

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{type(self).__name__}: {message}")


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
    if not path.is_file():
        raise InputError(path, "no such config file")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise InputError(path, f"not valid YAML ({getattr(e, 'problem', e)})",
                         line=None if line is None else line + 1) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise InputError(path, "expected a mapping of key: value at the top level")
    key_lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            key_lines[str(key.value)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for inner, _ in value.value:
                    key_lines[f"{key.value}.{inner.value}"] = inner.start_mark.line + 1
    return data, key_lines


def parse_set(item: str, parts: int) -> tuple[list[str], Any]:
    """`--set key=value` (parts=1) or `--set section.key=value` (parts=2): the key's parts and the YAML value."""
    key, sep, raw = item.partition("=")
    names = key.strip().split(".", parts - 1) if parts > 1 else [key.strip()]
    if not sep or len(names) != parts or not all(n.strip() for n in names):
        form = "key=value" if parts == 1 else "section.key=value (e.g. ppo.steps=50)"
        raise ConfigError(f"--set '{item}' is not of the form {form}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set '{item}': the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return [n.strip() for n in names], value
