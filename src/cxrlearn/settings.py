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
    flat = [inner for m in metadata for inner in (m.metadata if isinstance(m, FieldInfo) else [m])]
    bounds = {name: getattr(m, name.lower()) for m in flat for name in ("Ge", "Gt", "Le", "Lt")
              if isinstance(m, getattr(annotated_types, name))}
    if annotation is int:
        low, high = bounds.get("Ge"), bounds.get("Le")
        return "a whole number" + (f" from {low} to {high}" if low is not None and high is not None
                                   else f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
    if annotation is float:
        low = (f" > {bounds['Gt']}" if "Gt" in bounds else f" >= {bounds['Ge']}" if "Ge" in bounds else "")
        high = (f" < {bounds['Lt']}" if "Lt" in bounds else f" <= {bounds['Le']}" if "Le" in bounds else "")
        return f"a {'finite ' if not high else ''}number{low}{' and' if low and high else ''}{high}"
    return getattr(annotation, "__name__", str(annotation))


def fields_of(model: type[BaseModel] | Any, prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf setting of a model (or pydantic dataclass) under its dotted key, sections opened."""
    found: dict[str, FieldInfo] = {}
    declared = getattr(model, "model_fields", None) or getattr(model, "__pydantic_fields__", {})
    for name, field in declared.items():
        inner = field.annotation
        if isinstance(inner, type) and (issubclass(inner, BaseModel) or hasattr(inner, "__pydantic_fields__")):
            found.update(fields_of(inner, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = field
    return found


@dataclass(frozen=True)
class Problem:
    """The first wrong value pydantic found: its dotted key, what the key accepts, and the value given."""

    key: str
    expected: str
    given: Any

    def text(self, source: str, prefix: str = "", field_word: bool = False) -> str:
        key = f"field {prefix + self.key!r}" if field_word else prefix + self.key
        return f"{source}: {key} must be {self.expected}, not {self.given!r}"[:400]


def check(model: Any, values: Any, source: str, prefix: str = "", field_word: bool = False) -> Any:
    """``model`` (a settings class or pydantic dataclass) validated from ``values``; a :class:`ConfigError` naming
    ``source``, the key (under ``prefix``, as "field 'KEY'" with ``field_word``, a bundle's wording), what it
    accepts and the value given, for the first wrong value."""
    try:
        return TypeAdapter(model).validate_python(values)
    except ValidationError as err:
        raise ConfigError(first_problem(model, err, values).text(source, prefix, field_word)) from None


def first_problem(model: Any, err: ValidationError, values: Any) -> Problem:
    known = fields_of(model)
    problem = err.errors()[0]
    parts = [str(p) for p in problem["loc"]]
    for end in range(len(parts), 0, -1):  # the longest prefix of the location that is a setting
        key = ".".join(parts[:end])
        if key in known:
            given = values
            for part in parts[:end]:
                given = given.get(part) if isinstance(given, dict) else problem.get("input")
            return Problem(key, accepts(known[key]), given)
    return Problem(".".join(parts) or "the value", problem["msg"].lower(), problem.get("input"))
