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


def _parts(value: str) -> tuple[str | None, ...] | None:
    """A DTM's parts, the groups of _DTM: year, month, day, hour, minute, second, fraction, offset sign, offset
    hours, offset minutes (None when absent); None when the value is not a DTM. One ``groups()`` call reads
    them all (cheaper than a ``group()`` call per part)."""
    m = _DTM.fullmatch(value.strip())
    return m.groups() if m else None


def _date_part(year: str | None, month: str | None, day: str | None) -> str | None:
    if year is None or year == "0000":
        return None
    if month is None:
        return year
    if not "01" <= month <= "12":
        return None
    if day is None:
        return f"{year}-{month}"
    # Days 01-28 exist in every month of every year 0001-9999: no need to build a date. Only for ASCII digits
    # (\d also matches other scripts' digits, which the comparisons above do not order as numbers).
    if "01" <= day <= "28" and (year + month + day).isascii():
        return f"{year}-{month}-{day}"
    try:
        _dt.date(int(year), int(month), int(day))
    except ValueError:
        return None
    return f"{year}-{month}-{day}"


def _offset(sign: str, hh: str, mm: str) -> str | None:
    if hh > "14" or mm > "59" or (hh == "14" and mm != "00"):
        return None
    return f"{sign}{hh}:{mm}"


def _plain_timestamp(s: str, n: int) -> bool:
    """``s`` (of length ``n``) is YYYYMMDDHHMM[SS], with or without +/-ZZZZ, in ASCII digits."""
    if not s.isascii():
        return False
    if n == 12 or n == 14:
        return s.isdigit()
    return (n == 17 or n == 19) and s[-5] in "+-" and s[:-5].isdigit() and s[-4:].isdigit()


def to_date(value: str) -> str | None:
    """An HL7 DT/DTM as a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD); None when absent or invalid."""
    p = _parts(value) if value else None
    return _date_part(p[0], p[1], p[2]) if p else None


def to_datetime(value: str, default_offset: str | None) -> str | None:
    """An HL7 DTM/TS as a FHIR dateTime with the precision it has; see the module docstring for time zones."""
    if not value:
        return None
    s = value.strip()
    n = len(s)
    # What senders nearly always send, YYYYMMDD and YYYYMMDDHHMM[SS] with or without an offset in ASCII digits,
    # is sliced rather than matched (the regex with its nested optional groups is the costliest step) into
    # exactly the parts the regex would give. Anything else (a fraction, another precision, other digits, a
    # malformed value) goes through the regex.
    if n == 8 and s.isdigit() and s.isascii():
        # DT, YYYYMMDD: a date, no time nor offset. (Days up to 28 exist in every month: no ``_date_part``.)
        yyyy, mm, dd = s[:4], s[4:6], s[6:]
        if yyyy != "0000" and "01" <= mm <= "12" and "01" <= dd <= "28":
            return f"{yyyy}-{mm}-{dd}"
        return _date_part(yyyy, mm, dd)
    if not _plain_timestamp(s, n):
        p = _parts(s)
        if p is None:
            return None
        year, month, day, hour, minute, second, fraction, sign, off_h, off_m = p
    else:
        year, month, day, hour, minute = s[:4], s[4:6], s[6:8], s[8:10], s[10:12]
        second = s[12:14] if n == 14 or n == 19 else None
        fraction = None
        sign, off_h, off_m = (s[-5], s[-4:-2], s[-2:]) if n > 14 else (None, None, None)
    date = _date_part(year, month, day)
    if date is None:
        return None
    if hour is None:
        if sign is not None and _offset(sign, off_h or "", off_m or "") is None:
            return None
        return date
    minute = minute or "00"
    second = second or "00"
    if hour > "23" or minute > "59" or second > "59":
        return None
    if sign is not None:
        offset = _offset(sign, off_h or "", off_m or "")
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
    if not value:
        return None
    s = value.strip()
    if s.isdigit():  # no sign, so no offset (whether or not it is a valid DTM)
        return None
    if _plain_timestamp(s, len(s)):
        return _offset(s[-5], s[-4:-2], s[-2:])
    p = _parts(s)
    if p is None or p[7] is None:
        return None
    return _offset(p[7], p[8] or "", p[9] or "")


def period(start: str | None, end: str | None) -> dict[str, Any] | None:
    """A Period from FHIR dateTimes; None when both are absent."""
    p: dict[str, Any] = {}
    if start:
        p["start"] = start
    if end:
        p["end"] = end
    return p or None
