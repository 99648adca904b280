"""Typed configs with one declaration per option.

An option is a dataclass field made by ``option(default, help, check=..., valid=...)``: its type
(the annotation), default, help text and check live there and nowhere else. From that one
declaration come the config's validation (``TypedConfig``), the command-line flags
(``cli.options``) and the study spec's searchable keys (``studies.spec``).
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from defectforge.core.errors import ConfigError, DataError, one_line
from defectforge.core.storage import is_uri

LOCAL_ONLY = "this option reads a file or folder on this machine: copy it to this machine first"


# Seeds reach NumPy's generators, which take 0 .. 2^32 - 1: a negative one failed mid-run.
SEED = (lambda v: 0 <= v < 2**32, "from 0 to 2^32 - 1")


def option(
    default: Any = MISSING,
    help: str = "",
    check: Callable[[Any], bool] | None = None,
    valid: str = "",
    *,
    cli: bool = True,
    searchable: bool = False,
    choices: tuple = (),
    metavar: str | None = None,
    flag: str | None = None,
    path: bool | str = False,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A config field: ``check(value)`` True means valid, ``valid`` says what valid is.

    ``cli``: the command line gets a flag for it (``flag``, default ``--<name-with-dashes>``);
    ``path``: a file or folder, made absolute where it is given (``"local"``: one read on this
    machine only, so a store URI is refused); ``parse``: how the command line
    reads its text; ``searchable``: a study may search it.
    """
    metadata = {
        "parse": parse,
        "flag": flag,
        "path": path,
        "help": help,
        "check": check,
        "valid": valid,
        "cli": cli,
        "searchable": searchable,
        "choices": choices,
        "metavar": metavar,
    }
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def same_option(cls: type, name: str, default: Any = MISSING, **changes: Any) -> Any:
    """Option ``name`` of ``cls`` as a field of another config, under that config's own name:
    one declaration (help, check, valid values) for a value two configs hold. ``default``
    replaces its default; ``changes`` its metadata (e.g. ``searchable=True``)."""
    spec = next(f for f in fields(cls) if f.name == name)
    metadata = {**spec.metadata, **changes}
    if default is MISSING:
        default = spec.default
    return field(default=default, metadata=metadata)


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field (annotations are strings under PEP 563)."""
    return typing.get_type_hints(cls)


def scalar_type(annotation: Any) -> tuple[type | None, bool]:
    """(the scalar type behind ``annotation``, whether None is allowed); (None, ...) if it is
    not one of bool, int, float, str."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else None
    return (annotation if annotation in (bool, int, float, str) else None), optional


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the option's scalar type; a ConfigError if it is of another kind, or a
    non-finite number. JSON and YAML give ints where floats are meant: those are accepted."""
    kind, optional = scalar_type(annotation)
    if kind is None or (value is None and optional):
        return value
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(
            f"{name} = {value!r}: must be of type {kind.__name__}; {_type_fix(kind, value)}"
        )
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r}: must be a finite number")
    return value


def _type_fix(kind: type, value: Any) -> str:
    """How to write a value of ``kind``; YAML reads ``1e-3`` (no dot) as text, not a number."""
    if kind in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return (
                f"write it as a number, {number!r} (YAML reads {value} as text: a number needs a "
                "dot before its exponent, as in 1.0e-3)"
            )
    return {
        int: "write a whole number, e.g. 10",
        float: "write a number, e.g. 0.5",
        bool: "write true or false",
        str: "write text, e.g. in quotes",
    }[kind]


def check_field(spec: Field, value: Any, annotation: Any) -> Any:
    """``value`` for field ``spec`` after its type and its own check."""
    value = coerce(spec.name, value, annotation)
    metadata = spec.metadata
    if metadata.get("path") == "local" and isinstance(value, str) and is_uri(value):
        raise ConfigError(f"{spec.name} = {value!r} is on object storage; {LOCAL_ONLY}")
    if metadata.get("choices") and value is not None and value not in metadata["choices"]:
        raise ConfigError(
            f"{spec.name} = {value!r}: must be one of {', '.join(map(str, metadata['choices']))}"
        )
    check = metadata.get("check")
    if check is not None and value is not None:
        try:
            ok = check(value)
        except ConfigError as err:
            raise ConfigError(f"{spec.name} = {value!r}: {err}") from None
        if not ok:
            raise ConfigError(f"{spec.name} = {value!r}: must be {metadata['valid']}")
    return value


def _nested_config(annotation: Any) -> type[TypedConfig] | None:
    """The config class a field holds (``X`` or ``X | None``), if it holds one."""
    members = typing.get_args(annotation) or (annotation,)
    found = [m for m in members if isinstance(m, type) and issubclass(m, TypedConfig)]
    return found[0] if found else None


def _from_json(name: str, value: Any, annotation: Any) -> Any:
    """A JSON value as the field holds it: lists as tuples, mappings of nested configs as them."""
    nested = _nested_config(annotation)
    if nested is not None and value is not None and not isinstance(value, dict):
        raise ConfigError(
            f"{name} = {value!r}: must be a mapping of {nested.kind} options (e.g. {name}: {{}} "
            f"for its defaults); remove {name} to leave it out"
        )
    if isinstance(value, dict) and nested is not None:
        try:
            return nested.from_dict(value)
        except ConfigError as err:
            raise ConfigError(f"{name}.{err}") from None
    return tuple(value) if isinstance(value, list) else value


def _is_required(spec: Field) -> bool:
    return spec.default is MISSING and spec.default_factory is MISSING


class TypedConfig:
    """Base of frozen config dataclasses: every option checked on construction (type, finite
    numbers, its own check), then ``check()`` for rules between options; JSON round trip that
    rejects unknown keys."""

    kind = "config"

    def __post_init__(self):
        hints = field_types(type(self))
        for spec in fields(self):
            value = check_field(spec, getattr(self, spec.name), hints[spec.name])
            object.__setattr__(self, spec.name, value)
        self.check()

    def check(self) -> None:
        """Rules between options; a subclass raises ConfigError."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def options(cls) -> list[Field]:
        return list(fields(cls))

    @classmethod
    def searchable(cls) -> dict[str, Field]:
        return {f.name: f for f in fields(cls) if f.metadata.get("searchable")}

    @classmethod
    def from_dict(cls, values: dict):
        if not isinstance(values, dict):
            raise ConfigError(f"a {cls.kind} is a mapping of option: value, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.kind} keys {unknown}; valid: {sorted(known)}")
        required = [f.name for f in fields(cls) if _is_required(f)]
        missing = [name for name in required if name not in values]
        if missing:
            raise ConfigError(f"{missing[0]} = None: missing; the {cls.kind} needs it")
        hints = field_types(cls)
        return cls(**{k: _from_json(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def load(cls, path: str | Path):
        """The config saved at ``path``; an unreadable or invalid file is a DataError."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, OSError) as err:  # ConfigError and JSON errors are ValueErrors
            problem = err if isinstance(err, ConfigError) else f"not valid JSON ({err})"
            raise DataError(
                path,
                f"not a valid {cls.kind}: {one_line(str(problem))}",
                "restore the file or retrain",
            ) from None
