"""Configs as YAML files: strict loading, typed `key=value` overrides, dumping.

Keys are STRICT: an unknown key raises `PcbkitError` naming the file and the dotted key, with the
closest valid key as a suggestion; values are coerced to the field's type (int, float, bool, str,
Literal choices, tuples, optional values) or refused. `base: other.yaml` (relative to the file)
starts from another file, merged section by section. Overrides are dotted `key=value` strings
whose value is parsed as YAML (`solver.lr_steps=[3000,4000]`, `model.weights=null`).
`load_config` returns resolved configs (architecture defaults filled in), so a saved config
spells out every value. Details: docs/training.md §1.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from pcb_analysis.atomic import write_text_atomic
from pcb_analysis.errors import PcbkitError
from pcb_train.config_schema import ModelConfig, TrainConfig

BASE_KEY = "base"
MAX_BASE_DEPTH = 8


# --------------------------------------------------------------------------------------------
# generic dict <-> dataclass conversion with strict keys and type checks


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, choices: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` or raise _Mismatch. Strings are parsed for numbers (YAML reads
    `1e-4` as a string)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Mismatch from None
                if f.is_integer():
                    return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch


def from_dict(cls: type, data: Any, *, source: str | Path, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping with strict keys; errors name `source` and the dotted key."""
    where = prefix.rstrip(".") or "top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PcbkitError(f"{source}: {where}: expected a mapping of keys, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise PcbkitError(f"{source}: unknown key '{prefix}{key}'{_suggest(str(key), names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, source=source, prefix=f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise PcbkitError(
                f"{source}: key '{prefix}{key}': expected {_type_name(tp)}, got {value!r}"
            ) from None
    try:
        return cls(**kwargs)
    except PcbkitError as err:  # __post_init__ messages start with the dotted key
        raise PcbkitError(f"{source}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict (tuples become lists), YAML/JSON friendly."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    if depth > MAX_BASE_DEPTH:
        raise PcbkitError(f"{path}: '{BASE_KEY}' chain deeper than {MAX_BASE_DEPTH} files (a cycle?)")
    if not path.is_file():
        raise PcbkitError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise PcbkitError(f"{path}: not valid YAML{at}") from None
    except UnicodeDecodeError as err:
        bad = err.object[err.start]
        raise PcbkitError(f"{path}: not a UTF-8 text file (byte {err.start} is 0x{bad:02x})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PcbkitError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise PcbkitError(f"{path}: key '{BASE_KEY}' must be a file path")
    return _deep_merge(_read_yaml((path.parent / base).resolve(), depth + 1), data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise PcbkitError(f"override '{text}': expected key=value (e.g. model.num_classes=12)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise PcbkitError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(cls: type, tree: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set tree[parts] = value after checking each part names a field (strict keys)."""
    node, node_cls, done = tree, cls, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise PcbkitError(f"override '{text}': unknown key '{done}{part}'{_suggest(part, names, done)}")
        tp = _hints(node_cls)[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise PcbkitError(f"override '{text}': '{done}{part}' is a section; set one of its keys")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, node_cls, done = child, tp, f"{done}{part}."
        else:
            if not last:
                raise PcbkitError(f"override '{text}': '{done}{part}' is not a section")
            node[part] = value


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply dotted `key=value` overrides (typed by the target field) and re-validate.

    Architecture defaults are not re-resolved here: `load_config` applies overrides before it
    resolves, so `model.arch=tiny` on an r50 file picks up the tiny defaults.
    """
    if not overrides:
        return cfg
    tree = to_dict(cfg)
    for text in overrides:
        parts, value = _parse_override(text)
        _set_dotted(TrainConfig, tree, parts, value, text)
    return from_dict(TrainConfig, tree, source="command-line overrides")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, resolve arch defaults."""
    if path is None:
        cfg = TrainConfig()
    else:
        p = Path(path)
        cfg = from_dict(TrainConfig, _read_yaml(p), source=p)
    return apply_overrides(cfg, overrides).resolved()


def model_config_from_dict(data: Mapping[str, Any], source: str | Path) -> ModelConfig:
    """A ModelConfig from a plain dict (e.g. the one stored in a checkpoint), strict keys, resolved."""
    return from_dict(ModelConfig, dict(data), source=source, prefix="model.").resolved()


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists (`lr_steps: [16.0, 22.0]`)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML, atomically (loadable again by `load_config`)."""
    write_text_atomic(path, config_to_yaml(cfg))
