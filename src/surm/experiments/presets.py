"""Typed experiment presets: frozen dataclasses whose fields carry help text and are checked.

Each experiment declares its preset as a subclass of :class:`Preset`, one field per setting,
written with :func:`setting` (a default and a help line), and names instances ``smoke``
(seconds, for tests), ``quick`` (minutes, the default) and ``full`` (the documented run)::

    @dataclass(frozen=True, kw_only=True)
    class SweepPreset(Preset):
        seeds: tuple[int, ...] = setting((0,), "training seeds")
        lr: float | None = setting(None, "learning rate (None: each method's default)")

    PRESETS = {"smoke": SweepPreset(name="smoke", seeds=(0,)), ...}

Every value is coerced to its field's type when an instance is made (lists become tuples, an
integer becomes a float where a float is expected, a method string becomes a
:class:`surm.harness.methods.Method`), so a preset written in code, one changed with
:meth:`Preset.replace` and one changed with ``--set key=value`` on the command line are checked
by the same code, and a bad value is refused with the field's name, the expected type and
what came.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

__all__ = ["Preset", "describe", "lr_for", "resolve", "setting"]

P = TypeVar("P", bound="Preset")


def setting(default: Any, help: str) -> Any:
    """A preset field with ``default`` and a help line (``metadata["help"]``); a mutable
    default (a dict) is copied for every instance."""
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    return type(value)(value)


@dataclass(frozen=True, kw_only=True)
class Preset:
    """The base of every experiment's preset; ``name`` names it in titles and the JSON."""

    name: str = setting("custom", "the preset's name, shown in titles and the JSON (not a setting)")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            try:
                value = _coerce(getattr(self, f.name), hints[f.name])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{f.name}: {err}") from None
            object.__setattr__(self, f.name, value)

    @classmethod
    def settings(cls) -> dict[str, str]:
        """``{field: help}`` of the settings (every field but ``name``)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name != "name"}

    def replace(self: P, **changes: Any) -> P:
        """A copy with ``changes``; ValueError naming the field on an unknown key or a bad value."""
        unknown = sorted(set(changes) - set(self.settings()))
        if unknown:
            raise ValueError(f"unknown setting {', '.join(unknown)}; settings: {', '.join(self.settings())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings (and ``name``) as plain values: methods as their strings, tuples as lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def resolve(experiment: str, presets: dict[str, P], preset: str, sets: Iterable[str] = ()) -> P:
    """``presets[preset]`` changed by ``--set KEY=VALUE`` strings (VALUE a Python literal, or a
    bare word taken as a string). Trains and loads no model, so the command line can check its
    input first (a method field imports the method vocabulary, and with it torch and PEFT).

    Raises:
        ValueError: an unknown preset, a malformed item, an unknown key (the message lists the
            settings) or a value of the wrong type (the message gives the expected type); the
            message starts with ``experiment``.
    """
    if preset not in presets:
        raise ValueError(f"{experiment}: unknown preset {preset!r}; presets: {', '.join(presets)}")
    config = presets[preset]
    changes: dict[str, Any] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{experiment}: --set expects KEY=VALUE, got {item!r}")
        if key not in config.settings():
            raise ValueError(f"{experiment}: unknown setting {key!r} in --set {item}; "
                             f"settings: {', '.join(config.settings())}")
        changes[key] = _literal(text.strip())
    try:
        return config.replace(**changes)
    except ValueError as err:
        raise ValueError(f"{experiment}: --set {err}") from None


def describe(config: Preset) -> str:
    """One line per setting: ``key = value`` and its help, for ``surm reproduce --show-preset``."""
    values = config.to_dict()
    width = max(len(k) for k in config.settings())
    lines = [f"{config.name} preset:"]
    for key, help in config.settings().items():
        lines.append(f"  {key:<{width}} = {values[key]!r}\n  {'':<{width}}   {help}")
    return "\n".join(lines)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# --------------------------------------------------------------------------- coercion


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (see the module docstring); TypeError / ValueError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        refused = None  # a ValueError is an arm of the right shape with a bad content: say that one
        for arm in args:
            try:
                return _coerce(value, arm)
            except TypeError:
                continue
            except ValueError as err:
                refused = refused or err
        if refused is not None:
            raise refused
        raise TypeError(f"expected {_name(hint)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected {_name(hint)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError(f"expected {_name(hint)}, got {value!r}")
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected {_name(hint)}, got {value!r}")
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    return _coerce_scalar(value, hint)


def _coerce_scalar(value: Any, hint: Any) -> Any:
    from surm.harness import methods

    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is methods.Method:
        if isinstance(value, (str, methods.Method)):
            return methods.parse(value)  # ValueError with the grammar
    else:
        raise TypeError(f"presets cannot hold {hint!r}")
    raise TypeError(f"expected {_name(hint)}, got {value!r}")


def _name(hint: Any) -> str:
    """A type in words: ``a list of method strings``, ``a number or None``."""
    from surm.harness import methods

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(_name(args[0]))}"
        return "a list (" + ", ".join(_name(a) for a in args) + ")"
    if origin is dict:
        return f"a dict {{{_bare(_name(args[0]))}: {_bare(_name(args[1]))}}}"
    words = {type(None): "None", bool: "True or False", int: "an integer", float: "a number", str: "a string",
             methods.Method: "a method string (e.g. lora:8)"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _bare(words: str) -> str:
    for article in ("a ", "an "):
        if words.startswith(article):
            return words[len(article):]
    return words


def _plural(words: str) -> str:
    words = _bare(words)
    if " (" in words:
        head, tail = words.split(" (", 1)
        return f"{head}s ({tail}"
    return words + "s"


def _plain(value: Any) -> Any:
    from surm.harness import methods

    if isinstance(value, methods.Method):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def lr_for(lr: float | dict[Any, float] | None, method: Any) -> float | None:
    """The learning rate a preset's ``lr`` setting gives ``method``: one value for every method,
    a ``{method: lr}`` dict (methods it lacks: None), or None (the method's default)."""
    return lr.get(method) if isinstance(lr, dict) else lr
