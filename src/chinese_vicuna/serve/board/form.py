"""The Train tab's form, generated from the config dataclasses (``config.py``: fields, types, docstrings).

A key added to a dataclass appears in the form, the command line and the validation with no change
here. Values travel as the strings a person types (lists comma-separated) and become ``--key value``
flags: the exact command line the CLI runs, validated by the CLI's own ``load_config``.
"""

from __future__ import annotations

import dataclasses
import shlex
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ...config import ConfigError, config_fields, field_help, load_config

# Keys whose values are filesystem paths typed by the user (checked by the board's PathGuard);
# ``write`` marks the one the run writes to.
PATH_KEYS = {"data_path": "read", "init_adapter": "read", "output_dir": "write", "resume": "read",
             "base_model": "read"}
# resume's non-path values and base_model's hub ids are not paths
RESUME_WORDS = {"auto", "latest", "true", "True"}


@dataclass
class FieldSpec:
    key: str
    group: str
    kind: Literal["choice", "bool", "int", "float", "list", "text"]
    default: Any
    doc: str
    choices: tuple = ()
    optional: bool = False

    @property
    def default_text(self) -> Any:
        return to_widget(self, self.default)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(tp))
    return tp, False


def field_specs() -> list[FieldSpec]:
    """Every config key, in the dataclasses' order, with its group, kind, default and docstring."""
    docs = {key: doc for key, _, doc in field_help()}
    specs = []
    for key, (group, f) in config_fields().items():
        tp, optional = _strip_optional(f.type)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        origin = typing.get_origin(tp)
        if origin is Literal:
            kind, choices = "choice", tuple(typing.get_args(tp))
        elif tp is bool:
            kind, choices = "bool", ()
        elif tp in (int, float):
            kind, choices = tp.__name__, ()
        elif origin is list:
            kind, choices = "list", ()
        else:
            kind, choices = "text", ()
        specs.append(FieldSpec(key, group, kind, default, " ".join(docs.get(key, "").split()), choices, optional))
    return specs


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value as its form widget holds it (lists as comma-separated text, None as empty)."""
    if spec.kind == "list":
        return ", ".join(map(str, value or []))
    if spec.kind == "bool":
        return bool(value)
    if spec.kind in ("int", "float"):
        # an optional number is a text box: empty means None (a number field cannot be empty)
        return ("" if value is None else str(value)) if spec.optional else value
    if value is None:
        return "" if spec.kind == "text" else None
    return value


def _same(spec: FieldSpec, value: Any) -> bool:
    default = "" if spec.default_text is None else spec.default_text
    value = "" if value is None else value
    if spec.kind in ("int", "float") and value != "" and default != "":
        try:
            return float(value) == float(default)
        except (TypeError, ValueError):
            return False
    return value == default


def _flag_value(spec: FieldSpec, value: Any) -> str:
    if spec.kind == "bool":
        return "true" if value else "false"
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "none" if value in (None, "") else str(value)


def to_argv(specs: list[FieldSpec], values: list[Any]) -> list[str]:
    """``--key value`` flags for every value that differs from its default (lists comma-separated)."""
    argv: list[str] = []
    for spec, value in zip(specs, values, strict=True):
        if _same(spec, value):
            continue
        if spec.kind == "list":
            items = [v.strip() for v in str(value or "").split(",") if v.strip()]
            if not items:
                argv += [f"--{spec.key}", "none"] if spec.optional else []
                continue
            argv += [f"--{spec.key}", ",".join(items)]  # the CLI splits list values on commas
        else:
            argv += [f"--{spec.key}", _flag_value(spec, value)]
    return argv


def command_line(argv: list[str]) -> str:
    return " ".join(["chinese-vicuna", "train", *map(shlex.quote, argv)])


def check(argv: list[str]):
    """The TrainConfig the CLI would build from ``argv`` (ConfigError otherwise)."""
    return load_config(None, argv)


def preset_values(specs: list[FieldSpec], path: str | Path) -> list[Any]:
    """The form's values after loading a YAML preset: the preset's keys, defaults for the rest."""
    p = Path(path)
    loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys")
    known = {s.key for s in specs}
    unknown = [k for k in loaded if k not in known]
    if unknown:
        raise ConfigError(f"{p}: unknown config key(s) {', '.join(unknown)}")
    out = []
    for spec in specs:
        if spec.key not in loaded:
            out.append(spec.default_text)
            continue
        value = loaded[spec.key]
        if spec.kind == "list" and not isinstance(value, list):
            value = [] if value is None else [value]
        out.append(to_widget(spec, value))
    return out
