"""HL7 v2 DTM/TS/DT -> FHIR date and dateTime.

An HL7 DTM ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]`` keeps its precision. FHIR requires a time zone
when a dateTime has a time, and HL7 says a DTM without an offset is in the sender's local time; the sender's
offset is taken from MSH-7 (the caller passes it as ``default_offset``). When MSH-7 has no offset either, the
value is cut to date precision rather than assuming UTC: it never claims a time it does not know. (An offset
taken from MSH-7 may be an hour off for a time on the other side of a daylight-saving change from the
message.) A value that is not a valid DTM (bad digits, month 13, 30 February, offset beyond 14:00) is dropped.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,9}))?)?)?)?)?)?(?:([+-])(\d{2})(\d{2}))?"
)


def _date_part(m: re.Match[str]) -> str | None:
    year, month, day = m.group(1, 2, 3)
    if year == "0000":
        return None
    if month is None:
        return year
    if not "01" <= month <= "12":
        return None
    if day is None:
        return f"{year}-{month}"
    try:
        _dt.date(int(year), int(month), int(day))
    except ValueError:
        return None
    return f"{year}-{month}-{day}"


def _offset(sign: str, hh: str, mm: str) -> str | None:
    if hh > "14" or mm > "59" or (hh == "14" and mm != "00"):
        return None
    return f"{sign}{hh}:{mm}"


def to_date(value: str) -> str | None:
    """An HL7 DT/DTM as a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD); None when absent or invalid."""
    m = _DTM.fullmatch(value.strip()) if value else None
    return _date_part(m) if m else None


def to_datetime(value: str, default_offset: str | None) -> str | None:
    """An HL7 DTM/TS as a FHIR dateTime with the precision it has; see the module docstring for time zones."""
    m = _DTM.fullmatch(value.strip()) if value else None
    if m is None:
        return None
    date = _date_part(m)
    if date is None:
        return None
    hour, minute, second, fraction, sign = m.group(4, 5, 6, 7, 8)
    if hour is None:
        if sign is not None and _offset(sign, m.group(9), m.group(10)) is None:
            return None
        return date
    minute = minute or "00"
    second = second or "00"
    if hour > "23" or minute > "59" or second > "59":
        return None
    if sign is not None:
        offset = _offset(sign, m.group(9), m.group(10))
        if offset is None:
            return None
    elif default_offset is not None:
        offset = default_offset
    else:
        return date
    frac = f".{fraction}" if fraction else ""
    return f"{date}T{hour}:{minute}:{second}{frac}{offset}"


def offset_of(value: str) -> str | None:
    """The UTC offset a DTM declares (e.g. MSH-7), as "+HH:MM"; None when it has none or it is invalid."""
    m = _DTM.fullmatch(value.strip()) if value else None
    if m is None or m.group(8) is None:
        return None
    return _offset(m.group(8), m.group(9), m.group(10))


def period(start: str | None, end: str | None) -> dict[str, Any] | None:
    """A Period from FHIR dateTimes; None when both are absent."""
    p: dict[str, Any] = {}
    if start:
        p["start"] = start
    if end:
        p["end"] = end
    return p or None
