"""Typed settings, declared once (pydantic v2): the value types every settings object is built from, and what is
derived from a declaration: the text of what a key accepts, and one error naming the key.

A setting is a pydantic field: its type (one of the types below, a ``Literal`` of choices, or ``X | None``), its
default, its range (``ge``/``gt``/``le``/``lt``) and its help (``description``). From that one declaration come
the validation on load (:func:`check`, which turns pydantic's errors into one :class:`ConfigError` naming the
file and key), the text of what a key accepts (:func:`accepts`, used by the errors and by ``docs/config.md``), the
YAML written to a run (``model_dump``) and the JSON Schema (``model_json_schema``).

Values are taken as YAML gives them, never coerced: ``"8"`` is not a whole number, ``2.0`` is not a whole number,
``"yes"`` is not true or false, and a whole number is a number.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from cxrlearn.errors import ConfigError


def _number(value: Any) -> Any:
    """A finite number as YAML gives it (a whole number counts); not a bool, not text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("not a finite number")
    return float(value)


def _exact(value: Any) -> Any:
    """For a ``Literal`` of numbers: 1 is 1, but True and 1.0 are not."""
    if isinstance(value, (bool, float)):
        raise ValueError("not one of the choices")
    return value


#: A finite number (a whole number is one too).
Real = Annotated[float, BeforeValidator(_number)]
#: A whole number: not a bool, not 2.0, not "8".
Whole = StrictInt
#: true or false: not "yes", not 1.
Flag = StrictBool


#: A non-empty text.
Text = Annotated[StrictStr, annotated_types.MinLen(1)]


@dataclass(frozen=True)
class Says:
    """What a type accepts, in words, where its type and range do not say it well (``Annotated[..., Says(…)]``)."""

    text: str


def Choice(*choices) -> Any:  # noqa: N802 - a type, named as one
    """One of ``choices`` (texts or whole numbers), exactly."""
    return Annotated[Literal[choices], BeforeValidator(_exact)]


class Settings(BaseModel):
    """A settings section: unknown keys are errors; assignments are checked like loading."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- derived from a declaration ------------------------------------------------------------------------------
def accepts(field: FieldInfo) -> str:
    """What a field accepts, in words, from its type and range: "a whole number from 1 to 65536", "null or one
    of adam, adamw", … A field whose rule is more than a type and a range says it in ``json_schema_extra``'s
    ``accepts``."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "accepts" in extra:
        return str(extra["accepts"])
    return _describe(field.annotation, field.metadata)


def _describe(annotation: Any, metadata: list) -> str:
    said = [m.text for m in metadata if isinstance(m, Says)]
    if said:
        return said[0]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *more = typing.get_args(annotation)
        return _describe(inner, [*more, *metadata])
    if origin in (Union, types.UnionType):
        members = typing.get_args(annotation)
        kinds = [m for m in members if m is not type(None)]
        named = [_describe(m, metadata if len(kinds) == 1 else []) for m in kinds]
        if len(named) == 1:
            return ("null or " if type(None) in members else "") + named[0]
        choices = [m for m in named if m.startswith("one of ")]
        words = [m for m in named if not m.startswith("one of ")] + [c.removeprefix("one of ") for c in choices]
        return ("null or " if type(None) in members else "") + " or ".join(words)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a non-empty text"
    if origin is dict:
        return f"an object whose values are {_describe(typing.get_args(annotation)[1], [])}"
    declared = _declared(annotation)
    if declared:
        names = list(declared)
        return "an object with " + (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0])
    flat = [inner for m in metadata for inner in (m.metadata if isinstance(m, FieldInfo) else [m])]

    def bound(kind: type) -> Any:
        return next((getattr(m, kind.__name__.lower()) for m in flat if isinstance(m, kind)), None)

    ge, gt, le, lt = (bound(kind) for kind in (annotated_types.Ge, annotated_types.Gt, annotated_types.Le,
                                                annotated_types.Lt))
    if annotation is int:
        return "a whole number" + (f" from {ge} to {le}" if ge is not None and le is not None
                                   else f" >= {ge}" if ge is not None else f" <= {le}" if le is not None else "")
    if annotation is float:
        low = f" > {gt}" if gt is not None else f" >= {ge}" if ge is not None else ""
        high = f" < {lt}" if lt is not None else f" <= {le}" if le is not None else ""
        return f"a {'finite ' if not high else ''}number{low}{' and' if low and high else ''}{high}"
    return getattr(annotation, "__name__", str(annotation))


def _declared(annotation: Any) -> dict[str, FieldInfo]:
    """The fields of a settings class, a record or a pydantic dataclass (also inside ``X | None``); {} otherwise."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        kinds = [m for m in typing.get_args(annotation) if m is not type(None)]
        return _declared(kinds[0]) if len(kinds) == 1 else {}
    if not isinstance(annotation, type):
        return {}
    return dict(getattr(annotation, "model_fields", None) or getattr(annotation, "__pydantic_fields__", {}))


def fields_of(model: type[BaseModel] | Any, prefix: str = "", sections: bool = False) -> dict[str, FieldInfo]:
    """Every leaf setting of a model (or pydantic dataclass) under its dotted key, sections opened (and listed
    themselves too, with ``sections``)."""
    found: dict[str, FieldInfo] = {}
    for name, field in _declared(model).items():
        inner = _declared(field.annotation)
        if inner and sections:
            found[f"{prefix}{name}"] = field
        if inner:
            found.update(fields_of(field.annotation, f"{prefix}{name}.", sections))
        else:
            found[f"{prefix}{name}"] = field
    return found


@dataclass(frozen=True)
class Problem:
    """The first wrong value pydantic found: its dotted key, what the key accepts, and the value given (or that
    the key is missing)."""

    key: str
    expected: str
    given: Any
    missing: bool = False

    def text(self, source: str, prefix: str = "", field_word: bool = False) -> str:
        key = f"field {prefix + self.key!r}" if field_word else prefix + self.key
        if self.missing:
            return f"{source}: {key} is missing"
        return f"{source}: {key} must be {self.expected}, not {self.given!r}"[:400]


def check(model: Any, values: Any, source: str, prefix: str = "", field_word: bool = False) -> Any:
    """``model`` (a settings class or pydantic dataclass) validated from ``values``; a :class:`ConfigError` naming
    ``source``, the key (under ``prefix``, as "field 'KEY'" with ``field_word``, a bundle's wording), what it
    accepts and the value given, for the first wrong value."""
    try:
        return TypeAdapter(model).validate_python(values)
    except ValidationError as err:
        raise ConfigError(first_problem(model, err, values).text(source, prefix, field_word)) from None
    except ConfigError as err:  # a value whose type reads it with checks of its own (a bundle's preprocessing)
        raise ConfigError(f"{source}: {err}") from None


def first_problem(model: Any, err: ValidationError, values: Any) -> Problem:
    """The first error's key: the longest start of its location that is a declared field (or section), one
    level further into a field that is an object of values (``thresholds.Effusion``)."""
    known = fields_of(model, sections=True)
    error = err.errors()[0]
    parts, given = [str(p) for p in error["loc"]], error.get("input")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key not in known:
            continue
        if error["type"] == "missing":
            return Problem(key, "", None, missing=True)
        expected = accepts(known[key])
        values_type = _values_type(known[key].annotation)
        if values_type is not None and end < len(parts):
            key, expected = f"{key}.{parts[end]}", _describe(values_type, [])
            end += 1
        return Problem(key, expected, _given(values, parts[:end], given))
    return Problem(".".join(parts) or "the value", error["msg"].lower(), given)


def _values_type(annotation: Any) -> Any:
    """V of ``dict[str, V]`` (also inside ``X | None``); None for any other type."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        kinds = [m for m in typing.get_args(annotation) if m is not type(None)]
        return _values_type(kinds[0]) if len(kinds) == 1 else None
    if typing.get_origin(annotation) is Annotated:
        return _values_type(typing.get_args(annotation)[0])
    return typing.get_args(annotation)[1] if typing.get_origin(annotation) is dict else None


def _given(values: Any, path: list[str], fallback: Any) -> Any:
    """The value at ``path`` in what was given (pydantic's own input where the path leaves the dicts)."""
    for part in path:
        if not isinstance(values, dict):
            return fallback
        values = values.get(part)
    return values
