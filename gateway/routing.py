"""Routes: which destinations a committed message goes to.

The rule set (rules/*.yaml) owns routes and destinations; the daemon config owns listeners. This module is
the part of the rules engine the pipeline calls on every message, so it is a precomputed, allocation-light
lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.contracts import InputKind


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    to: tuple[str, ...]
    sources: frozenset[str] = frozenset()  # empty: any
    kinds: frozenset[str] = frozenset()
    message_types: frozenset[str] = frozenset()  # "ADT" matches every ADT; "ADT^A01" only that event
    mapped: bool | None = None  # True: only messages mapped to FHIR; False: only unmapped ones

    def matches(self, source: str, kind: InputKind, message_type: str, mapped: bool) -> bool:
        if self.sources and source not in self.sources:
            return False
        if self.kinds and kind.value not in self.kinds:
            return False
        if self.message_types and not (
            message_type in self.message_types or message_type.split("^", 1)[0] in self.message_types
        ):
            return False
        return self.mapped is None or self.mapped == mapped


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def destinations(self, *, source: str, kind: InputKind, message_type: str, mapped: bool) -> list[str]:
        """Every destination of every matching route, each once, in rule order."""
        out: list[str] = []
        for r in self.routes:
            if r.matches(source, kind, message_type, mapped):
                for d in r.to:
                    if d not in out:
                        out.append(d)
        return out
