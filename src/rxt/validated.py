"""One base class for every validated settings dataclass: :class:`Validated`.

A subclass is a (frozen or plain) dataclass. When it is built, every field is checked against its
type hint (:func:`check_type`), then the class's :meth:`Validated.validate` runs its range and
cross-field rules. A bad value raises :class:`ConfigError` (a ``ValueError``) whose message names
the field as a dotted path, the rule and the value: ``memory.gate_init: must be in (0, 1), got
1.0``. :meth:`Validated.from_dict` builds one from a JSON or YAML mapping, rejecting unknown
fields (:class:`UnknownFieldError`) and building nested configs; :meth:`Validated.to_dict` is the
inverse.

Checked hints: ``bool``, ``int`` (``True`` is not an integer), ``float`` (an int or a float,
finite), ``str``, ``Literal[...]``, ``X | None``, nested :class:`Validated` classes and tuples
(``tuple[int, int]``, ``tuple[str, ...]``; a list is accepted and stored as a tuple, since JSON
and YAML have no tuples). Any other hint (``Mapping``, ``Sequence``, callables) is left to
``validate()``.

This module imports nothing else from rxt, so every package (``rxt.data`` included) may use it.
"""

from __future__ import annotations

import dataclasses
import math
import types
from functools import cache
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

__all__ = [
    "ConfigError",
    "UnknownFieldError",
    "Validated",
    "check_type",
    "fail",
    "is_int",
    "positive",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field (``path: message``)."""


class UnknownFieldError(ConfigError):
    """:meth:`Validated.from_dict` met fields the class does not have. ``unknown`` and ``known``
    are sorted field names, for callers that report them their own way."""

    def __init__(self, path: str, unknown: list[str], known: list[str]) -> None:
        self.path, self.unknown, self.known = path, unknown, known
        super().__init__(f"{path}{unknown[0]}: unknown field (known fields: {', '.join(known)})")


def fail(path: str, message: str) -> ConfigError:
    """The error for field ``path`` (dotted): ``ConfigError("path: message")``."""
    return ConfigError(f"{path}: {message}")


def positive(path: str, value: int | float) -> None:
    if value <= 0:
        raise fail(path, f"must be > 0, got {value}")


def is_int(value: Any) -> bool:
    """An integer and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_type(path: str, value: Any, hint: Any, _entry: str = "") -> Any:
    """Check ``value`` against ``hint`` (the hints of the module docstring); returns it, a list
    turned into a tuple where the hint is a tuple. Errors name ``path`` and, inside a tuple,
    the entry (``distances: entry [0] must be an integer, got 1.5``)."""

    def bad(rule: str) -> ConfigError:
        entry = f"entry {_entry} " if _entry else ""
        return fail(path, f"{entry}must be {rule}, got {value!r}")

    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value not in args:
            raise bad(f"one of {list(args)}")
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return value
        inner = [a for a in args if a is not type(None)]
        return check_type(path, value, inner[0], _entry) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, tuple | list):
            raise bad("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif args and len(value) != len(args):
            raise bad(f"a list of {len(args)}")
        if not args:
            return tuple(value)
        return tuple(
            check_type(path, v, a, f"{_entry}[{i}]")
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif hint is int:
        if not is_int(value):
            raise bad("an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("finite")
    elif hint is str:
        if not isinstance(value, str):
            raise bad("a string")
    elif isinstance(hint, type) and issubclass(hint, Validated) and not isinstance(value, hint):
        raise fail(path, f"must be an object ({hint.__name__}), got {type(value).__name__}")
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


class Validated:
    """Base of a validated dataclass: checks each field's type on construction, then
    :meth:`validate`; (de)serialises with :meth:`to_dict` and :meth:`from_dict`."""

    #: Put before field names in this class's errors: ``""`` for configs that sit in a tree
    #: (:meth:`from_dict` adds where they sit), ``"TrainConfig."`` for standalone ones.
    error_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            checked = check_type(f"{self.error_prefix}{f.name}", value, hints[f.name])
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.validate()

    def validate(self) -> None:
        """Range and cross-field checks; subclasses override (:meth:`require`, :func:`fail`)."""

    def error(self, name: str, message: str) -> ConfigError:
        """The error for this object's field ``name``."""
        return fail(f"{self.error_prefix}{name}", message)

    def require(self, name: str, ok: bool, rule: str) -> None:
        """Unless ``ok``: raise ``"<prefix>name: rule, got <value>"``."""
        if not ok:
            raise self.error(name, f"{rule}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = ""):
        """Build from a mapping: unknown fields are an error, nested mappings become nested
        configs; errors name the field with ``path`` (``"decoder."``) in front."""
        if not isinstance(data, dict):
            raise fail(
                path.rstrip(".") or cls.__name__, f"expected an object, got {type(data).__name__}"
            )
        hints = _hints(cls)
        names = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UnknownFieldError(f"{path}{cls.error_prefix}", unknown, names)
        kwargs = {}
        for name, value in data.items():
            sub_cls = _validated_in(hints[name])
            if sub_cls is not None and isinstance(value, dict):
                value = sub_cls.from_dict(value, f"{path}{name}.")
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            # Nested objects report field names relative to themselves; add where they sit.
            raise ConfigError(f"{path}{exc}") from None


def _validated_in(hint: Any) -> type[Validated] | None:
    for c in get_args(hint) or (hint,):
        if isinstance(c, type) and issubclass(c, Validated):
            return c
    return None
