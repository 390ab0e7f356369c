"""The customisable part of the HL7 v2 map: identifier systems, code-system URIs, local code maps and the default
time zone, read from the daemon config's ``[normalise]`` section (``gateway/config.py``) or given to
``gateway convert --config``.

Why configuration and not code: every hospital has its own assigning authorities ("ST MARY") and local code
systems ("99LAB"); the IG says to map them to the organisation's URIs, which only the organisation knows. The
defaults (no tables) give the config-free behaviour documented in docs/mapping.md, and cost nothing on the hot
path: lookups run only when a table is set.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.errors import ConfigError

_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})")
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class MappedCode:
    """The target of a local code map entry: a FHIR coding added in front of the sender's own."""

    system: str
    code: str
    display: str = ""


@dataclass(frozen=True)
class MappingSettings:
    """Tables the mapping consults before its built-in rules.

    - ``identifier_systems``: an assigning authority (HD-1 namespace id, or HD-2 universal id) -> the
      Identifier.system URI to use for identifiers it assigned (CX-4, XCN-9, EI-2/3);
    - ``coding_systems``: a coding system name as senders write it in CWE-3/6/12 -> code system URI (added to,
      and overriding, the HL7 table 0396 names the mapping knows);
    - ``code_maps``: (sender's coding system name, sender's code) -> a standard coding, like a FHIR ConceptMap:
      the mapped coding comes first and the sender's coding is kept after it;
    - ``z_segments``: a Z-segment name -> an extension URL: each such segment becomes an extension (one nested
      ``ZXX.n`` valueString per valued field) on the resource it follows (else the patient); Z-segments not
      listed are left in the raw message only;
    - ``default_timezone``: the sender's zone (IANA name such as ``Europe/London``, or ``+01:00``) for
      timestamps when neither the value nor MSH-7 carries an offset. Without it such times are cut to their date.
    """

    identifier_systems: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    coding_systems: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    code_maps: Mapping[tuple[str, str], MappedCode] = field(default_factory=lambda: MappingProxyType({}))
    default_timezone: str = ""
    z_segments: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        if self.default_timezone:
            zone_for(self.default_timezone)  # a bad zone is a ConfigError at load time, not per message

    @property
    def customised(self) -> bool:
        """True when any table is set (the mapping then takes its slower, table-consulting paths)."""
        return bool(self.identifier_systems or self.coding_systems or self.code_maps)

    def default_offset(self, local: str) -> str | None:
        """The UTC offset ("+HH:MM") of ``default_timezone`` at the local time ``local`` (an HL7 DTM without
        offset, e.g. MSH-7), or now when ``local`` is not a usable time; None without a default zone."""
        if not self.default_timezone:
            return None
        zone = zone_for(self.default_timezone)
        if isinstance(zone, str):
            return zone
        when = _local_datetime(local) or _dt.datetime.now(_dt.UTC).replace(tzinfo=None)
        delta = when.replace(tzinfo=zone).utcoffset() or _dt.timedelta(0)
        minutes = int(delta.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        hh, mm = divmod(abs(minutes), 60)
        return f"{sign}{hh:02d}:{mm:02d}"


DEFAULT_SETTINGS = MappingSettings()


def zone_for(name: str) -> ZoneInfo | str:
    """A fixed offset as "+HH:MM", or the IANA zone; ConfigError for anything else."""
    m = _OFFSET.fullmatch(name.strip())
    if m:
        sign, hh, mm = m.groups()
        if hh > "14" or mm > "59":
            raise ConfigError(f"default_timezone offset {name!r} is out of range", "normalise.default_timezone")
        return f"{sign}{hh}:{mm}"
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"default_timezone {name!r} is neither an IANA zone nor an offset like +01:00",
            "normalise.default_timezone",
        ) from None


def _local_datetime(value: str) -> _dt.datetime | None:
    digits = value.strip()[:14]
    if len(digits) < 8 or not digits.isdigit():
        return None
    digits = digits.ljust(14, "0") if len(digits) >= 12 else digits[:8] + "120000"
    try:
        return _dt.datetime.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def settings_from_config(
    identifier_systems: Mapping[str, str],
    coding_systems: Mapping[str, str],
    code_maps: list[Mapping[str, str]] | tuple[Any, ...],
    default_timezone: str,
    z_segments: Mapping[str, str] | None = None,
) -> MappingSettings:
    """Build the settings from the config's plain values (``NormaliseConfig``); ConfigError on a bad entry."""
    maps: dict[tuple[str, str], MappedCode] = {}
    for i, entry in enumerate(code_maps):
        get = entry.get if isinstance(entry, Mapping) else lambda k, e=entry: getattr(e, k, "")
        source_system, source_code = str(get("source_system") or ""), str(get("code") or "")
        target_system, target_code = str(get("target_system") or ""), str(get("target_code") or "")
        if not (source_system and source_code and target_system and target_code):
            raise ConfigError(
                "a code map needs source_system, code, target_system and target_code", f"normalise.code_maps[{i}]"
            )
        maps[(source_system, source_code)] = MappedCode(target_system, target_code, str(get("display") or ""))
    return MappingSettings(
        identifier_systems=MappingProxyType(dict(identifier_systems)),
        coding_systems=MappingProxyType(dict(coding_systems)),
        code_maps=MappingProxyType(maps),
        default_timezone=default_timezone,
        z_segments=MappingProxyType(dict(z_segments or {})),
    )
