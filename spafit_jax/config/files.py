"""Run configuration: YAML files merged in order, dotted overrides, one-line errors; the schema is in `schema`.

A run is described by one `Config` with seven sections (model, data, method, train, checkpoint,
parallel, distributed; see `schema`). The defaults are the offline demo (MiniLM on BBC News with
SPAFIT). `load_config` reads YAML files in order (later files win, key by key within a section),
then applies `section.key=value` overrides, then builds the sections, which check their values,
so a bad config fails with a one-line `ConfigError` (the field, the value, where it came from,
the fix) before anything heavy is imported or loaded. The command line is in `cli`.

Stdlib and PyYAML only: importing this module never imports jax, numpy, flax or transformers.
Sequences are stored as tuples (the dataclasses are frozen); mappings as plain dicts.
"""

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from spafit_jax.errors import ConfigError
from spafit_jax.config.schema import (
    CheckpointConfig, Config, DataConfig, DistributedConfig, MethodConfig, ModelConfig,
    ParallelConfig, TrainConfig,
)

__all__ = [
    "Config", "ModelConfig", "DataConfig", "MethodConfig", "TrainConfig", "CheckpointConfig",
    "ParallelConfig", "DistributedConfig", "SECTIONS", "load_config", "config_from_dict", "to_dict",
    "config_yaml", "default", "format_value", "parse_yaml",
]

# The shipped configs: inside the installed package (a wheel maps configs/ to spafit_jax/configs),
# else the checkout's configs/ folder. Found from the package folder, wherever in it this module sits.
_PACKAGE = next(p for p in Path(__file__).resolve().parents if p.name == "spafit_jax")
CONFIGS_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


# ----------------------------------------------------------------------------------------------
# YAML reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one); raises `self.error`."""

    error: type[ConfigError] = ConfigError

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise self.error(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key '{key}': the key '{key}' "
                                 f"appears twice in one mapping (first on line {seen[key] + 1}) and the second would "
                                 "silently replace the first; keep only one of them")
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, name: str, error: type[ConfigError] = ConfigError) -> Any:
    """`text` read by YAML's safe loader, a key given twice in one mapping refused (one line naming `name`
    and the line, as `error`); other YAML errors pass through as `yaml.YAMLError`. Every YAML file the
    commands read (configs, experiment files) goes through it."""
    loader = _UniqueKeyLoader(text)
    loader.name, loader.error = name, error
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _missing_file_message(path: str) -> str:
    msg = f"config file '{path}' not found (working directory {os.getcwd()})"
    p = Path(path)
    for guess in (CONFIGS_DIR.parent / p, CONFIGS_DIR / p):
        if not p.is_absolute() and guess.is_file():
            return f"{msg}; did you mean --config {guess}?"
    folder = p.parent if p.parent.is_dir() else None
    if folder is None and not p.is_absolute() and (CONFIGS_DIR.parent / p.parent).is_dir():
        folder = CONFIGS_DIR.parent / p.parent
    if folder is not None:
        names = sorted(q.name for q in folder.glob("*.y*ml"))
        close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.5)
        if close:
            return f"{msg}; did you mean --config {folder / close[0]}?"
        if names:
            return f"{msg}; files in {folder}: {', '.join(names)}"
    return f"{msg}; pass an existing YAML file (the shipped ones are under {CONFIGS_DIR})"


def shipped_config(path: str) -> Path | None:
    """The shipped config a relative name means when no such file exists here: `glue/mrpc.yaml` or
    `configs/glue/mrpc.yaml` -> <CONFIGS_DIR>/glue/mrpc.yaml (so commands work outside the checkout)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return None
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    guess = CONFIGS_DIR.joinpath(*parts) if parts else None
    return guess if guess is not None and guess.is_file() else None


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        p = shipped_config(str(path)) or p
    if not p.exists():
        raise ConfigError(_missing_file_message(str(path)))
    if p.is_dir():
        raise ConfigError(f"config path '{path}' is a directory; pass a YAML file inside it")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}; check the file and its permissions") from e
    try:
        data = parse_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (model:, data:, ...), "
            f"got {type(data).__name__}; see configs/default.yaml"
        )
    return data


# ----------------------------------------------------------------------------------------------
# Merging


# Names people bring from other trainers (Hugging Face, peft) -> ours.
_ALIASES = {
    "learning_rate": "train.lr", "num_epochs": "train.epochs", "num_train_epochs": "train.epochs",
    "warmup": "train.warmup_ratio", "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.batch_size", "max_seq_length": "data.max_length",
    "model_name_or_path": "model.name", "r": "method.lora_rank", "rank": "method.lora_rank",
    "alpha": "method.lora_alpha", "target_modules": "method.lora_targets", "method": "method.name",
}


def _suggest(section: str | None, key: str) -> str | None:
    """The closest known 'section.key' (or section name when `section` is None)."""
    if key in _ALIASES:
        return _ALIASES[key]
    if section is None:
        close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.6)
        if close:
            return close[0]
        for s in SECTIONS:  # a field given at top level, e.g. `seed: 1`
            if key in _fields(s):
                return f"{s}.{key}"
        return None
    close = difflib.get_close_matches(key, list(_fields(section)), n=1, cutoff=0.6)
    if close:
        return f"{section}.{close[0]}"
    for s in SECTIONS:  # right key, wrong section
        if key in _fields(s):
            return f"{s}.{key}"
    everything = [f"{s}.{k}" for s in SECTIONS for k in _fields(s)]
    close = difflib.get_close_matches(f"{section}.{key}", everything, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_section(name: Any, source: str) -> ConfigError:
    hint = _suggest(None, str(name))
    fix = f"did you mean '{hint}'?" if hint else f"sections are: {', '.join(SECTIONS)}"
    return ConfigError(f"unknown config section '{name}' ({source}); {fix}")


def _unknown_key(section: str, key: Any, source: str) -> ConfigError:
    hint = _suggest(section, str(key))
    fix = f"did you mean '{hint}'?" if hint else f"{section} keys are: {', '.join(_fields(section))}"
    return ConfigError(f"unknown config key '{section}.{key}' ({source}); {fix}")


def _merge(merged: dict, origins: dict, data: Mapping, source: str) -> None:
    """Merge one file's sections into `merged`, key by key; a field's value is replaced whole."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown_section(section, source)
        if values is None:  # an empty `train:` section
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"config section '{section}' must be a mapping of keys ({source}), got "
                f"{type(values).__name__} {values!r}; write e.g. '{section}:' then indented 'key: value' lines"
            )
        fields = _fields(section)
        for key, value in values.items():
            if key not in fields:
                raise _unknown_key(section, key, source)
            merged[section][key] = value
            origins[(section, key)] = source


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text  # e.g. an unbalanced bracket in a regex: keep it as a string


def _apply_override(merged: dict, origins: dict, item: str) -> None:
    source = f"override '{item}'"
    if not isinstance(item, str):
        raise ConfigError(f"override {item!r} must be a string 'section.key=value'")
    if "=" not in item:
        if item.endswith((".yaml", ".yml")):
            raise ConfigError(f"override '{item}' looks like a file; load config files with --config {item}")
        raise ConfigError(f"override '{item}' has no '='; write section.key=value, e.g. train.lr=5e-4")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".", 2)
    if len(parts) < 2 or not all(parts[:2]):
        hint = _suggest(None, dotted) if dotted else None
        fix = (f"did you mean '{hint}={text}'?" if hint and "." in hint
               else "write section.key=value, e.g. train.lr=5e-4")
        raise ConfigError(f"override '{item}' must name section.key; {fix}")
    section, key = parts[0], parts[1]
    if section not in SECTIONS:
        raise _unknown_section(section, source)
    if key not in _fields(section):
        raise _unknown_key(section, key, source)
    value = _parse_value(text)
    if len(parts) == 3:  # train.lr_by_label.head=1e-3 sets one entry of a mapping field
        if typing.get_origin(_types(section)[key]) is not dict:
            raise ConfigError(
                f"override '{item}': {section}.{key} is not a mapping, so it has no entry '{parts[2]}'; "
                f"write {section}.{key}=VALUE"
            )
        current = merged[section].get(key, default(section, key))
        if not isinstance(current, Mapping):
            current = {}
        value = {**current, parts[2]: value}
    merged[section][key] = value
    origins[(section, key)] = source


def default(section: str, key: str) -> Any:
    """The default value of field `section.key`."""
    f = _fields(section)[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# ----------------------------------------------------------------------------------------------
# Types


class _Mismatch(Exception):
    pass


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in arms)
        return text + (" or null" if len(arms) < len(args) else "")
    if origin is tuple:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return f"a mapping of strings to {_describe(args[1]).split(' ', 1)[1]}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}[tp]


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or raise _Mismatch. int -> float is fine, numeric strings -> float too."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
            raise _Mismatch
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, str) and args[0] is str:  # method.lora_targets=query,value
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_coerce(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _coerce(v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                out = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(out):
            raise _Mismatch
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config field type {tp!r}")  # pragma: no cover - a bug here


def _build_section(section: str, values: Mapping, origins: Mapping) -> Any:
    hints = _types(section)
    kwargs = {}
    for key, value in values.items():
        try:
            kwargs[key] = _coerce(value, hints[key])
        except _Mismatch:
            where = origins.get((section, key), "default")
            shown = f"{type(value).__name__} {value!r}"
            if str in (hints[key], *typing.get_args(hints[key])) and isinstance(value, (bool, int, float)):
                fix = "quote it so YAML reads a string (YAML turns yes/no/on/off into booleans)"
            else:
                fix = f"e.g. {section}.{key}={format_value(default(section, key))}"
            raise ConfigError(
                f"{section}.{key} must be {_describe(hints[key])}, got {shown} ({where}); {fix}"
            ) from None
    try:
        return SECTIONS[section](**kwargs)
    except ConfigError as e:
        if e.field is None:
            raise
        where = f" ({origins.get((section, e.field), 'default')})"
        text = str(e)
        cut = text.find("; ")
        raise ConfigError(text + where if cut < 0 else text[:cut] + where + text[cut:]) from None


# ----------------------------------------------------------------------------------------------
# Public API


def config_from_dict(data: Mapping, *, source: str = "from a dict") -> Config:
    """Build and validate a Config from a nested mapping {section: {key: value}} (missing keys: defaults)."""
    merged: dict[str, dict] = {s: {} for s in SECTIONS}
    origins: dict = {}
    _merge(merged, origins, data, source)
    return _finish(merged, origins)


def _finish(merged: Mapping, origins: Mapping) -> Config:
    return Config(**{s: _build_section(s, merged[s], origins) for s in SECTIONS})


def load_config(paths: Sequence[str] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults, then YAML `paths` in order (later wins, key by key), then `section.key=value` overrides.

    Override values are parsed as YAML (`train.lr=5e-4`, `method.lora_targets=[query,key,value]`,
    `train.max_steps=null`); `train.lr_by_label.head=1e-3` sets one entry of a mapping field.
    Raises ConfigError (one line: the key, what is wrong, where it came from, the fix).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(overrides, str):
        overrides = [overrides]
    merged: dict[str, dict] = {s: {} for s in SECTIONS}
    origins: dict = {}
    for path in paths:
        _merge(merged, origins, _read_yaml(os.fspath(path)), f"from {os.fspath(path)}")
    for item in overrides:
        _apply_override(merged, origins, item)
    return _finish(merged, origins)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(config: Config) -> dict:
    """The config as plain nested dicts/lists/scalars (YAML- and JSON-safe), in field order."""
    return {
        s: {f.name: _plain(getattr(getattr(config, s), f.name)) for f in dataclasses.fields(SECTIONS[s])}
        for s in SECTIONS
    }


def config_yaml(config: Config, path: str | os.PathLike) -> str:
    """The resolved config as the YAML text of a file at `path` (a header naming it, then every field)."""
    header = (
        "# Resolved spafit_jax config (defaults + --config files + overrides), written by the trainer.\n"
        f"# Load it with: python -m spafit_jax.train --config {path}\n"
    )
    return header + yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def format_value(value: Any) -> str:
    """A field value as YAML-ish text for messages and --help (null, true, [a, b], {k: v})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)
