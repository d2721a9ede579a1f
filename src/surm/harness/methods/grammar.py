"""Method strings: ``kind[:positional][:key=value]...`` parsed once into a :class:`Method`.

The kinds, their sizes and knobs are the records of :mod:`.kinds`; examples: ``lora:8``,
``surm:circulant``, ``surm:circulant:block_size=128``, ``surm:ldr:rank=2``,
``surm:toeplitz:serial``, ``houlsby:32``, ``c3a:64``, ``fourierft:1000``, ``adapterdrop:32:drop=2``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from .kinds import KINDS, KNOBS, TARGETS

__all__ = ["GRAMMAR", "Method", "parse"]

#: The placements of SURM adapters (:data:`surm.peft.PLACEMENTS`, kept here so that parsing
#: imports no torch).
PLACEMENTS = ("parallel", "serial")


@dataclass(frozen=True)
class Method:
    """A parsed method string (see the module docstring)."""

    kind: str
    structure: str | None = None
    placement: str = "parallel"
    rank: int | None = None
    knobs: tuple[tuple[str, Any], ...] = ()

    @property
    def record(self):
        """The kind's record (:class:`~surm.harness.methods.kinds.Kind`)."""
        return KINDS[self.kind]

    @property
    def name(self) -> str:
        """The canonical method string; ``parse(m.name) == m``."""
        parts = [self.kind]
        knobs = self.knobs
        size = self.record.size
        if self.kind == "surm":
            parts.append(self.structure)
            if self.placement != "parallel":
                parts.append(self.placement)
        elif size not in (None, "rank"):  # a size kept as a knob is written positionally
            parts.append(str(self.knob(size)))
            knobs = tuple((k, v) for k, v in knobs if k != size)
        elif self.rank is not None:
            parts.append(str(self.rank))
        parts += [f"{k}={_show(v)}" for k, v in knobs]
        return ":".join(parts)

    def __str__(self) -> str:
        return self.name

    @property
    def family(self) -> str:
        """The SURM structure (``circulant``) or the kind (``lora``): what plots colour by."""
        return self.structure if self.kind == "surm" else self.kind

    @property
    def label(self) -> str:
        """A short human label, e.g. ``SURM circulant (serial)``, ``LoRA r=8``, ``FourierFT n=768``."""
        record = self.record
        if self.kind == "surm":
            knobs = "".join(f" {k}={_show(v)}" for k, v in self.knobs)
            return f"SURM {self.structure}" + (" (serial)" if self.placement == "serial" else "") + knobs
        if record.size_label is not None:
            rest = "".join(f" {k}={_show(v)}" for k, v in self.knobs if k != record.size)
            return f"{record.title} {record.size_label}={self.knob(record.size)}" + rest
        rank = f" r={self.rank}" if self.rank is not None else ""
        return record.title + rank + "".join(f" {k}={_show(v)}" for k, v in self.knobs)

    @property
    def lr_keys(self) -> tuple[str, ...]:
        """Keys of a profile's ``lr`` overrides and the kinds' rates that apply, most specific
        first: ``lora``; ``adapterdrop`` then ``houlsby``; ``surm:kronecker`` /
        ``surm:kronecker:serial`` then ``surm:parallel`` / ``surm:serial``."""
        if self.record.lr_from is not None:
            return (self.kind, self.record.lr_from)
        if self.kind != "surm":
            return (self.kind,)
        own = f"surm:{self.structure}" + (":serial" if self.placement == "serial" else "")
        return (own, f"surm:{self.placement}")

    def knob(self, key: str, default: Any = None) -> Any:
        return dict(self.knobs).get(key, default)


GRAMMAR = ("Method strings: " + " | ".join(k.grammar for k in KINDS.values())
           + ", with optional :key=value knobs (e.g. surm:ldr:rank=2).")


def parse(text: str | Method) -> Method:
    """Parse a method string such as ``"surm:circulant:block_size=128"`` (module docstring);
    a :class:`Method` is returned as it is.

    Raises ValueError with the grammar on anything it does not understand.
    """
    if isinstance(text, Method):
        return text
    parts = [p.strip() for p in str(text).strip().split(":")]
    kind = parts[0].lower()
    if kind not in KINDS:
        raise ValueError(f"unknown method {text!r}: it must start with one of {', '.join(KINDS)}. {GRAMMAR}")
    record = KINDS[kind]
    positional = [p for p in parts[1:] if "=" not in p]
    knobs: dict[str, Any] = {}
    for part in parts[1:]:
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in KNOBS:
                raise ValueError(f"method {text!r}: unknown knob {key!r}; knobs: {', '.join(KNOBS)}")
            knobs[key] = _value(value)
    structure, placement, rank = None, "parallel", None
    if kind == "surm":
        structure, placement = _structure(text, positional)
    elif record.size == "rank":
        if not positional or not positional[0].isdigit() or int(positional[0]) < 1:
            raise ValueError(f"method {text!r}: give a positive rank, e.g. {kind}:8")
        rank = int(positional.pop(0))
    if knobs and not record.knobs:
        raise ValueError(f"method {text!r}: {kind} takes no knobs")
    for key in knobs:
        if key not in record.knobs:
            raise ValueError(f"method {text!r}: {kind} takes no knob {key!r}; its knobs: {', '.join(record.knobs)}")
    _check_knob_values(text, knobs, placement)
    if record.size not in (None, "rank"):
        what, example = record.size_words
        if not positional or not positional[0].isdigit() or int(positional[0]) < 1:
            raise ValueError(f"method {text!r}: give a positive {what}, e.g. {example}")
        knobs[record.size] = int(positional.pop(0))
    if positional:
        raise ValueError(f"method {text!r}: unexpected part(s) {positional}. {GRAMMAR}")
    return Method(kind, structure, placement, rank, tuple(sorted(knobs.items())))


def _structure(text: str, positional: list[str]) -> tuple[str, str]:
    """``(structure, placement)`` of a ``surm:STRUCTURE[:PLACEMENT]`` string (consumed from
    ``positional``)."""
    from surm import structured

    if not positional:
        raise ValueError(f"method {text!r}: name a structure, e.g. surm:circulant; one of {structured.names()}")
    structure = positional.pop(0)
    structured.get(structure)  # ValueError listing the known structures
    placement = "parallel"
    if positional:
        placement = positional.pop(0)
        if placement not in PLACEMENTS:
            raise ValueError(f"method {text!r}: placement must be one of {PLACEMENTS}")
    return structure, placement


def _check_knob_values(text: str, knobs: dict[str, Any], placement: str) -> None:
    if "targets" in knobs and knobs["targets"] not in TARGETS:
        raise ValueError(f"method {text!r}: targets must be one of {TARGETS} (qv: attention query and value; "
                         f"all: every linear map of each block)")
    if "targets" in knobs and placement == "serial":
        raise ValueError(f"method {text!r}: targets is for parallel placements; serial adapters sit at the "
                         f"Houlsby positions")
    if "drop" in knobs and not (isinstance(knobs["drop"], int) and knobs["drop"] >= 0):
        raise ValueError(f"method {text!r}: drop is a number of blocks, 0 or more")


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _show(value: Any) -> str:
    return str(value).replace(" ", "")
