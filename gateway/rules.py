"""The rule set: named destinations (sink configs) and routes, loaded from YAML.

Issue #6 adds signatures, encryption, dedup rules and FHIRPath conditions to this file format; the shape here
(destinations by name, routes that pick them) is the one that stays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.config import read_text, validation_error
from gateway.destinations import DestinationConfig
from gateway.errors import ConfigError
from gateway.routing import Route, Router


class RouteMatch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[str, ...] = Field((), description="Source names; empty: any source.")
    kinds: tuple[Literal["hl7v2", "dicom", "mqtt"], ...] = Field((), description="Input kinds; empty: any.")
    message_types: tuple[str, ...] = Field(
        (), description='HL7 message types: "ADT" (any event) or "ADT^A01"; empty: any.'
    )
    mapped: bool | None = Field(None, description="true: only messages mapped to FHIR; false: only unmapped.")


class RouteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Route name in logs.")
    match: RouteMatch = Field(default_factory=RouteMatch, description="All conditions must hold.")
    to: tuple[str, ...] = Field(min_length=1, description="Destination names.")


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    destinations: dict[str, DestinationConfig] = Field(description="Named destinations.")
    routes: tuple[RouteConfig, ...] = Field(description="Routes, in order.")

    @model_validator(mode="after")
    def _known_destinations(self) -> RuleSet:
        for i, r in enumerate(self.routes):
            for d in r.to:
                if d not in self.destinations:
                    raise ValueError(f"routes[{i}] ({r.name}) sends to unknown destination {d!r}")
        return self

    def router(self) -> Router:
        return Router(
            [
                Route(
                    name=r.name,
                    to=r.to,
                    sources=frozenset(r.match.sources),
                    kinds=frozenset(r.match.kinds),
                    message_types=frozenset(r.match.message_types),
                    mapped=r.match.mapped,
                )
                for r in self.routes
            ]
        )


def load_rules(path: str | Path) -> RuleSet:
    p = Path(path)
    text = read_text(p, "rule set")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", str(p)) from None
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data) from None
