"""OBX-6 units -> UCUM, OBX-7 reference ranges and numbers, after the IG's CWE[Quantity] and OBX maps.

A unit is given the UCUM system only when it *is* UCUM: the sender says so (CWE-3 ``UCUM``), or the unit parses
as a UCUM expression built from the atoms and prefixes labs use. Anything else ("mcg", "cells/hpf") stays as
``unit`` text without a system: FHIR's qty-3 forbids a code without a system, and a wrong UCUM code is worse
than none.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

UCUM = "http://unitsofmeasure.org"

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_ATOMS = frozenset(
    [
        "g",
        "L",
        "l",
        "mol",
        "eq",
        "U",
        "m",
        "s",
        "min",
        "h",
        "d",
        "wk",
        "mo",
        "a",
        "%",
        "Cel",
        "K",
        "Pa",
        "bar",
        "cal",
        "J",
        "W",
        "V",
        "A",
        "Hz",
        "Ohm",
        "kat",
        "osm",
        "Bq",
        "Gy",
        "Sv",
        "dB",
        "[iU]",
        "[IU]",
        "[ppm]",
        "[ppb]",
        "[degF]",
        "[in_i]",
        "[ft_i]",
        "[lb_av]",
        "[oz_av]",
        "[pH]",
        "[HPF]",
        "[LPF]",
        "[arb'U]",
        "[drp]",
        "[mi_i]",
        "mm[Hg]",
        "cm[H2O]",
        "[mm_Hg]",
        "{beats}",
        "{breaths}",
        "{cells}",
        "{count}",
        "{score}",
        "{ratio}",
        "/min",
    ]
)
_PREFIXES = ("da", "Y", "Z", "E", "P", "T", "G", "M", "k", "h", "d", "c", "m", "u", "n", "p", "f", "a")


@lru_cache(maxsize=512)
def is_ucum(unit: str) -> bool:
    """Whether ``unit`` is a UCUM expression we recognise: terms joined by ``.`` and ``/``, each a known atom
    (with an optional metric prefix and exponent), a number such as ``10*3``, or an annotation ``{...}``."""
    unit = unit.strip()
    if not unit or " " in unit or len(unit) > 40:
        return False
    if unit in _ATOMS:
        return True
    text = unit[1:] if unit.startswith("/") else unit
    return all(term and _term_ok(term) for term in re.split(r"[./]", text))


def _term_ok(term: str) -> bool:
    if re.fullmatch(r"\{[^{}]*\}", term) or re.fullmatch(r"10[*^][+-]?\d+|\d+", term):
        return True
    m = re.fullmatch(r"(.+?)(-?\d+)?(\{[^{}]*\})?", term)
    if not m:
        return False
    atom = m.group(1)
    if atom in _ATOMS:
        return True
    return any(atom.startswith(p) and atom[len(p) :] in _ATOMS for p in _PREFIXES)


def number(text: str) -> int | float | None:
    """An HL7 NM as a JSON number (an int when it has no fraction), None when it is not a number."""
    t = text.strip()
    if not t or not _NUMBER.fullmatch(t):
        return None
    if "." in t:
        value = float(t)
        return value if value == value and abs(value) < 1e300 else None
    try:
        return int(t)
    except ValueError:
        return None


def quantity(value: int | float, unit_code: str, unit_text: str, unit_system: str) -> dict[str, Any]:
    """A Quantity with the unit as UCUM when it is UCUM (see the module docstring)."""
    q: dict[str, Any] = {"value": value}
    ucum = unit_code and (unit_system.upper() in ("UCUM", "ANS+") or (not unit_system and is_ucum(unit_code)))
    unit = unit_text or unit_code
    if unit:
        q["unit"] = unit
    if ucum:
        q["system"] = UCUM
        q["code"] = " ".join(unit_code.split())
    return q


_RANGE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*(?:-|–|\.\.|to)\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*")
_BOUND = re.compile(r"\s*(<=|>=|<|>|≤|≥)\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*")


def reference_range(text: str, unit: dict[str, Any] | None) -> dict[str, Any] | None:
    """OBX-7 -> Observation.referenceRange: "3.5-5.0" as low and high, "<5" / ">10" as one bound, anything
    else as text. ``unit``: the result's Quantity without value, so the bounds carry the same unit."""
    text = text.strip()
    if not text:
        return None
    m = _RANGE.fullmatch(text)
    if m:
        low, high = number(m.group(1)), number(m.group(2))
        if low is not None and high is not None:
            return {"low": {**(unit or {}), "value": low}, "high": {**(unit or {}), "value": high}}
    m = _BOUND.fullmatch(text)
    if m:
        bound = number(m.group(2))
        if bound is not None:
            side = "high" if m.group(1) in ("<", "<=", "≤") else "low"
            return {side: {**(unit or {}), "value": bound}, "text": text}
    return {"text": text}
