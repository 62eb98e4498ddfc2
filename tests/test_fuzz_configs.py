"""Fuzzing every stage's config: whatever a YAML file or a `--set` holds, the config is built or refused in one line.

The property, for each stage (pretrain, sft, sample, annotate, reward train, ppo, evaluate, the
pipeline's policy section) and for the sections of a pipeline file: a good config mutated with
random bytes, non-UTF-8, truncation, wrong types, NaN and infinities, huge numbers and strings,
lone surrogates, NUL, unknown keys and nested garbage either builds a config whose every field has
its declared type and stays within its size cap, or raises one AlignloopError line that names the
file (and the line and key when the problem is one key's) or the `--set` it came from. Nothing is
written. Examples are derandomized and bounded like tests/test_fuzz_readers.py (FUZZ_EXAMPLES each,
ALIGNLOOP_FUZZ_EXAMPLES=N for a longer hunt).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.annotate.stage import AnnotateConfig
from alignloop.config import FIELD_LIMITS, MAX_TEXT_CHARS, StageConfig, read_yaml_mapping
from alignloop.errors import AlignloopError, InputError
from alignloop.evaluate import EvaluateConfig
from alignloop.pipeline import PolicyConfig, check_spec, load_pipeline_file, section_class
from alignloop.ppo import PPOConfig
from alignloop.pretrain import PretrainConfig
from alignloop.reward.train import RewardTrainConfig
from alignloop.sampling import SampleConfig
from alignloop.sft import SFTConfig

FUZZ_EXAMPLES = int(os.environ.get("ALIGNLOOP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
CLASSES = [PretrainConfig, SFTConfig, SampleConfig, AnnotateConfig, RewardTrainConfig, PPOConfig, EvaluateConfig,
           PolicyConfig]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_lm_dir) -> tuple[Path, dict[type, dict]]:
    """Real inputs for every stage (one tiny model in every model role), and a good config of each."""
    d = tmp_path_factory.mktemp("configs")
    (d / "prompts.jsonl").write_text('{"prompt": "Life is"}\n{"prompt": "Cats"}\n')
    (d / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (d / "corpus.txt").write_text("One fortune.\n\nAnother one.\n")
    (d / "campaign.jsonl").write_text('{"item_id": "p1", "prompt": "a", "responses": ["b", "c"]}\n')
    m, out = str(tiny_lm_dir), str(d / "out")
    good = {
        PretrainConfig: {"out_dir": out, "corpus": str(d / "corpus.txt"), "vocab_size": 320, "n_layer": 1,
                         "n_embd": 32, "n_head": 2, "block_size": 32, "batch_size": 8, "epochs": 0.5},
        SFTConfig: {"model": m, "out_dir": out, "batch_size": 8, "max_length": 64},
        SampleConfig: {"model": m, "prompts": str(d / "prompts.jsonl"), "out_dir": out, "k": 3},
        AnnotateConfig: {"campaign": str(d / "campaign.jsonl"), "out_dir": out, "annotators": 2, "overlap": 2},
        RewardTrainConfig: {"model": m, "data": str(d / "pairs.jsonl"), "out_dir": out, "batch_size": 8},
        PPOConfig: {"policy": m, "reward_model": m, "prompts": str(d / "prompts.jsonl"), "out_dir": out,
                    "batch_size": 8, "mini_batch_size": 4, "steps": 2},
        EvaluateConfig: {"policy": m, "reference": m, "reward_model": m, "prompts": str(d / "prompts.jsonl"),
                         "out_dir": out, "num_prompts": 2},
        PolicyConfig: {"model": m},
    }
    return d, good


def tree(directory: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*") if p.is_file())


# -- what goes in -----------------------------------------------------------------------------

EDGE_VALUES = ["x" * 100_000, "x" * (MAX_TEXT_CHARS + 1), "a" * 300 + "/b", "a\x00b", "\ud800", "caf\u00e9 \U0001f600",
               "1e-4", "nan", "inf", "-5", "0", "true", "1_000", "", " ", "auto", "cuda:9x", "fp16", "vader", ":f",
               ".x:f", "os:no_such_function", "x.py:f", 2**63, -(2**63) - 1, 10**300, -(10**18), 65537, 131073,
               10**9, 1e308, -1e-308, float("nan"), float("inf"), float("-inf"), True, False, None, [], {}]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.integers(-(10**30), 10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(EDGE_VALUES))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids,
                                                                                         max_size=3), max_leaves=8)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def typed_values(cls: type, name: str) -> st.SearchStrategy:
    """Values of the field's own type, around its limits and the edges stages check (0, 1, negatives)."""
    hint = typing.get_type_hints(cls)[name]
    kind = next(k for k in (typing.get_args(hint) or (hint,)) if k is not type(None))
    high = cls.limits().get(name, (None, 10**6))[1]
    if kind is int:
        return st.one_of(st.integers(-3, 70), st.sampled_from([0, 1, 2, high, high + 1, -high]),
                         st.integers(-(2**63), 2**63))
    if kind is float:
        return st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 1.0, 0.5, -1.0, high, high * 2]),
                         st.floats(allow_nan=True, allow_infinity=True))
    if kind is bool:
        return st.booleans()
    return st.one_of(st.sampled_from(["auto", "cpu", "vader", "rank", "pairwise", "", ".", "/"]), st.text(max_size=8))


@st.composite
def mutated(draw, cls: type, good: dict) -> dict:
    """`good` with 0-3 keys set to values of their own type or to any value, deleted, or added (unknown)."""
    config = dict(good)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["typed", "typed", "typed", "any", "any", "delete", "unknown"]))
        if op in ("typed", "any"):
            name = draw(st.sampled_from(field_names(cls)))
            config[name] = draw(typed_values(cls, name) if op == "typed" else values)
        elif op == "delete" and config:
            config.pop(draw(st.sampled_from(sorted(config))))
        else:
            config[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return config


def dump(config: dict) -> bytes:
    try:
        return yaml.safe_dump(config, allow_unicode=False).encode("utf-8")
    except yaml.YAMLError:  # a key YAML cannot write (say, a tuple): the JSON of it is YAML too
        return json.dumps(config, default=str).encode("utf-8", errors="surrogatepass")


@st.composite
def config_bytes(draw, cls: type, good: dict) -> bytes:
    """A YAML file: the mutated config, perhaps damaged as bytes; or bytes that were never YAML."""
    content = dump(draw(mutated(cls, good)))
    damage = draw(st.sampled_from(["none", "none", "truncate", "splice", "non-utf8", "random", "nested", "big"]))
    if damage == "truncate":
        content = content[:draw(st.integers(0, len(content)))]
    elif damage == "splice":
        at = draw(st.integers(0, len(content)))
        content = content[:at] + draw(st.binary(min_size=1, max_size=12)) + content[at:]
    elif damage == "non-utf8":
        content += b"seed: caf\xe9\n"
    elif damage == "random":
        content = draw(st.binary(max_size=200))
    elif damage == "nested":
        depth = draw(st.sampled_from([50, 5000]))
        content += b"batch_size: " + b"[" * depth + b"]" * depth + b"\n"
    elif damage == "big":
        content += draw(st.sampled_from([b"k: 1" + b"0" * 5000 + b"\n", b"# " + b"x" * (2**20 + 10) + b"\n",
                                         b"1: 2\n", b"? [a]\n: 1\n", b"---\na: 1\n", b"seed: !!python/name:os.system\n",
                                         b"x: &a [1, 1]\ny: &b [*a, *a]\nz: [*b, *b]\n"]))
    return content


def as_set_value(value) -> str:
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()


def set_items(cls: type) -> st.SearchStrategy[str]:
    """`--set` arguments: a field of `cls` (or any name) = YAML text of a typed or any value; or any text."""
    name = st.sampled_from(field_names(cls))
    return st.one_of(
        name.flatmap(lambda n: (typed_values(cls, n) | values).map(lambda v: f"{n}={as_set_value(v)}")),
        st.builds(lambda k, v: f"{k}={as_set_value(v)}", st.text(max_size=6), values),
        st.text(max_size=20),
        st.sampled_from(["k", "=", "k=", "=3", "batch_size=[" * 3000, "steps=1" + "0" * 5000, "seed=\udcff",
                         "max_new_tokens=1e9", "lr=.nan", "device=cuda:x", "model=/no/such/dir"]),
    )


# -- what must come out -------------------------------------------------------------------------

def assert_typed_and_capped(config: StageConfig) -> None:
    """A config that was built holds its declared types, within the caps."""
    hints = typing.get_type_hints(type(config))
    limits = type(config).limits()
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if typing.get_origin(hint) is list:  # e.g. EvaluateConfig.other_judges: list[str]
            (item,) = typing.get_args(hint)
            assert isinstance(value, list) and all(type(v) is item for v in value), (f.name, value)
            continue
        kinds = [k for k in (typing.get_args(hint) or (hint,))]
        if value is None:
            assert type(None) in kinds, f.name
            continue
        kind = next(k for k in kinds if k is not type(None))
        if kind in (int, float, bool, str, Path):
            assert type(value) is kind or (kind is Path and isinstance(value, Path)), (f.name, value)
        if kind is float:
            assert value == value and abs(value) != float("inf"), (f.name, value)
        if kind in (int, float) and f.name in limits:
            low, high = limits[f.name]
            assert value <= high and (low is None or value >= low), (f.name, value)


def assert_built_or_one_line(build, *sources: str) -> StageConfig | AlignloopError:
    """The config `build()` makes (typed, capped), or its error: one short line starting with one of `sources`."""
    try:
        config = build()
    except AlignloopError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 2000, message
        assert message.startswith(sources), message
        return e
    assert_typed_and_capped(config)
    return config


@FUZZ
@given(st.data())
def test_a_fuzzed_yaml_config_builds_or_is_one_line_naming_the_file(world, data):
    d, good = world
    cls = data.draw(st.sampled_from(CLASSES))
    path = d / "fuzzed.yaml"
    path.write_bytes(data.draw(config_bytes(cls, good[cls])))
    before = tree(d)
    result = assert_built_or_one_line(lambda: cls.load(path), str(path))
    if isinstance(result, InputError) and result.field is not None:  # one key's problem: its line too
        assert result.path == str(path) and result.line is not None, str(result)
    assert tree(d) == before


@FUZZ
@given(st.data())
def test_fuzzed_set_values_build_or_are_one_line_naming_the_set(world, data):
    d, good = world
    cls = data.draw(st.sampled_from(CLASSES))
    path = d / "good.yaml"
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in good[cls].items()}))
    sets = data.draw(st.lists(set_items(cls), min_size=1, max_size=3))
    before = tree(d)
    assert_built_or_one_line(lambda: cls.load(path, sets), str(path), "--set")
    assert tree(d) == before


@FUZZ
@given(st.data())
def test_fuzzed_pipeline_sections_are_checked_before_any_stage_runs(world, data):
    """Every section of a pipeline file through the checks `pipeline.check_sections` runs up front."""
    d, good = world
    sections = {"sft": good[SFTConfig], "sample": good[SampleConfig], "annotate": good[AnnotateConfig],
                "reward": good[RewardTrainConfig], "ppo": good[PPOConfig], "evaluate": good[EvaluateConfig]}
    name = data.draw(st.sampled_from(sorted(sections)))
    sections[name] = data.draw(mutated(section_class(name), sections[name]))
    path = d / "pipeline.yaml"
    path.write_bytes(dump({"out": str(d / "run"), **sections}))
    before = tree(d)
    try:
        spec = load_pipeline_file(path)
        check_spec(spec)
        _, lines = read_yaml_mapping(path)
        for section, values in spec.sections.items():
            section_class(section).check_values(values, str(path), lines, prefix=f"{section}.")
    except AlignloopError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(str(path)), message
        if isinstance(e, InputError) and e.field is not None and "." in e.field:
            assert e.line is not None, message
    assert tree(d) == before
    assert not (d / "run").exists()


def edge_values(cls: type, name: str) -> list:
    hint = typing.get_type_hints(cls)[name]
    kind = next(k for k in (typing.get_args(hint) or (hint,)) if k is not type(None))
    high = cls.limits().get(name, (None, 10**6))[1]
    by_kind = {int: [0, 1, -1, high, high + 1, -(2**63) - 1, 2**63, 1.5, "12"],
               float: [0.0, -0.0, 1e-300, -1.0, 1.0, 1e308, float("nan"), "1e-4", 10**400],
               bool: [True, False, 0, "true"],
               str: ["", ".", "/", "x" * 300, "a\x00b", "\ud800", "vader", "x.py:f"],
               Path: ["", ".", "/", "x" * 300, "a\x00b", "\ud800", "/no/such/file"]}
    return by_kind.get(kind, []) + [None, [], {}, True, "junk"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_at_its_edges_builds_or_is_one_line_naming_the_line(world, cls):
    """Systematically, beside the random search: each field of each config, one at a time, at the edges
    its stage checks (0, 1, -1), at and past its cap, the wrong type, null, empty and unusable text."""
    d, good = world
    path = d / "edges.yaml"
    tried = 0
    for name in field_names(cls):
        for value in edge_values(cls, name):
            path.write_bytes(dump({**good[cls], name: value}))
            result = assert_built_or_one_line(lambda: cls.load(path), str(path))
            if isinstance(result, InputError) and result.field is not None:
                assert result.line is not None, str(result)
            tried += 1
    assert tried >= 5 * len(field_names(cls))


# -- the caps, by hand ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, key, value, cap", [
    (SampleConfig, "batch_size", 10**9, "at most 65,536"),
    (SampleConfig, "max_new_tokens", 10**9, "at most 131,072"),
    (SampleConfig, "k", 17, "at most 16"),
    (SFTConfig, "max_length", 10**7, "at most 131,072"),
    (SFTConfig, "epochs", 1e12, "at most 100,000"),
    (PPOConfig, "steps", 10**12, "at most 10,000,000"),
    (PPOConfig, "mini_batch_size", 2**20, "at most 65,536"),
    (RewardTrainConfig, "normalize_samples", 10**9, "at most 10,000,000"),
    (EvaluateConfig, "num_prompts", 10**12, "at most 100,000,000"),
    (AnnotateConfig, "annotators", 10**6, "at most 10,000"),
    (AnnotateConfig, "port", 70_000, "at most 65,535"),
    (PretrainConfig, "n_layer", 10**5, "at most 1,024"),
    (PretrainConfig, "batch_size", 60_000, "at most 16,777,216"),  # with block_size 512: tokens per step
])
def test_an_absurd_size_is_refused_naming_the_line_and_the_cap(world, cls, key, value, cap):
    d, good = world
    path = d / "cap.yaml"
    path.write_text(yaml.safe_dump({**good[cls], key: value, **({"block_size": 512} if key == "batch_size" and
                                                                cls is PretrainConfig else {})}))
    line = read_yaml_mapping(path)[1][key]
    with pytest.raises(InputError) as err:
        cls.load(path)
    assert str(err.value).startswith(f"{path}:{line}: field '{key}': "), str(err.value)
    assert cap in str(err.value)


def test_a_model_too_big_to_build_is_refused_though_each_size_is_within_its_cap(world):
    d, good = world
    path = d / "big_model.yaml"
    path.write_text(yaml.safe_dump({**good[PretrainConfig], "n_layer": 64, "n_embd": 8192, "n_head": 64}))
    with pytest.raises(AlignloopError, match=r"has 5.2e\+10 parameters; at most 1e\+10 is allowed") as err:
        PretrainConfig.load(path)
    assert str(err.value).startswith(f"{path}: ")


def test_every_size_cap_names_a_field_of_some_config():
    """A cap on a field no config has guards nothing (a renamed field would silently lose its cap)."""
    from alignloop.realdata import HumanSentimentConfig
    from alignloop.reward.evaluate import RewardEvalConfig

    fields = {f.name for cls in CLASSES + [RewardEvalConfig, HumanSentimentConfig] for f in dataclasses.fields(cls)}
    assert set(FIELD_LIMITS) <= fields, set(FIELD_LIMITS) - fields


@pytest.mark.parametrize("item, expected", [
    ("batch_size=1e9", "--set batch_size: expected a whole number, got '1e9'"),
    ("batch_size=1000000000", "--set batch_size: at most 65,536 is allowed"),
    ("lr=.nan", "--set lr: expected a finite number, got nan"),
    ("tensorboard=yes please", "--set tensorboard: expected true or false, got 'yes please'"),
    ("device=cuda:x", "--set device: expected auto, cpu, cuda, cuda:N or another torch device"),
    ("steps=[[[1]]]", "--set steps: expected a whole number, got [[[...]]]"),
    ("steps=" + "[" * 3000 + "]" * 3000, "the value is not valid YAML (nested too deeply)"),
    ("policy=/no/such/dir", "--set policy: /no/such/dir: no such model directory"),
])
def test_a_bad_set_value_is_one_line_naming_the_set(world, item, expected):
    d, good = world
    path = d / "ppo.yaml"
    path.write_text(yaml.safe_dump(good[PPOConfig]))
    with pytest.raises(AlignloopError) as err:
        PPOConfig.load(path, [item])
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_pipeline_with_an_absurd_ppo_batch_is_refused_before_any_stage(world):
    d, good = world
    path = d / "absurd_pipeline.yaml"
    path.write_text(yaml.safe_dump({"out": str(d / "absurd_run"), "sft": good[SFTConfig],
                                    "ppo": {"batch_size": 10**9}}))
    with pytest.raises(InputError, match="field 'ppo.batch_size': at most 65,536"):
        check_spec(load_pipeline_file(path))


def test_the_cli_refuses_a_bad_config_in_one_line_and_writes_nothing(world, tmp_path):
    """The installed command: exit 2, one `error:` line naming the file, line and key, no traceback, no output."""
    d, good = world
    path = tmp_path / "sample.yaml"
    path.write_text(yaml.safe_dump({**good[SampleConfig], "out_dir": str(tmp_path / "out"), "batch_size": 10**12}))
    result = subprocess.run([sys.executable, "-m", "alignloop", "sample", "--config", str(path)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {path}:") and "field 'batch_size'" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
