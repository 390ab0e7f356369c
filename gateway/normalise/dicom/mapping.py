"""A study summary (``STUDY_FORMAT``) -> a transaction Bundle with one Patient and one ImagingStudy.

Resource ids are deterministic: the ImagingStudy's from the Study Instance UID, the Patient's from Patient ID
and its issuer, built like the HL7 v2 mapping's (``hd_system`` for the issuer), so a patient an HL7 feed and a
modality both name with the same assigning authority is one Patient. A Patient ID without an issuer is scoped
by the calling AE title: two modalities that each number their own patients must not merge them.

Dates: a DICOM date and time are local time; FHIR requires a time zone with a time. Timezone Offset From UTC
(0008,0201) supplies it when the modality sends it; without it only the date is given, never a guessed zone.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.ids import resource_id
from gateway.normalise import MapContext, MappingError
from gateway.normalise.hl7v2.bundle import TransactionBundle, meta_for
from gateway.normalise.hl7v2.datatypes import clean, hd_system
from gateway.normalise.hl7v2.tables import V2_0203

from . import Json

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EN_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_TZ = re.compile(r"([+-])(\d{2})(\d{2})")
_CODE = re.compile(r"[^\s]+( [^\s]+)*")
_GENDER = {"M": "male", "F": "female", "O": "other"}
# PN component groups in order (PS3.5 6.2): alphabetic, ideographic, phonetic.
_REPRESENTATION = ("ABC", "IDE", "SYL")


def map_study(summary: Json, ctx: MapContext) -> dict[str, Any]:
    """The Bundle for one study summary. Raises MappingError (PHI-free reason) when the summary has no valid
    Study Instance UID or no series."""
    study_uid = str(summary.get("study_instance_uid", ""))
    if not UID_RE.fullmatch(study_uid) or len(study_uid) > 64:
        raise MappingError("the study summary has no valid Study Instance UID")
    series_in = summary.get("series") or []
    if not series_in:
        raise MappingError("the study summary has no series")
    header: Json = summary.get("header") or {}
    source = meta_for(ctx)
    patient = _patient(header, str(summary.get("calling_ae", "")), study_uid, source)
    study: Json = {
        "resourceType": "ImagingStudy",
        "id": resource_id("ImagingStudy", study_uid),
        "meta": {"source": source},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "status": "available",
    }
    accession = clean(_text(header, "AccessionNumber"))
    if accession:
        study["identifier"].append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession})
    study["subject"] = {"reference": f"Patient/{patient['id']}"}
    started = _datetime(_text(header, "StudyDate"), _text(header, "StudyTime"), _text(header, "TimezoneOffsetFromUTC"))
    if started:
        study["started"] = started
    referrer = _person_text(_text(header, "ReferringPhysicianName"))
    if referrer:
        study["referrer"] = {"display": referrer}
    series_out: list[Json] = []
    modalities: list[str] = []
    total = 0
    for s in series_in:
        built = _series(s, _text(header, "TimezoneOffsetFromUTC"))
        if built is None:
            continue
        series_out.append(built)
        total += built["numberOfInstances"]
        code = built["modality"]["code"]
        if code not in modalities:
            modalities.append(code)
    if not series_out:
        raise MappingError("the study summary has no series with a valid Series Instance UID")
    study["modality"] = [{"system": DCM, "code": m} for m in modalities]
    study["numberOfSeries"] = len(series_out)
    study["numberOfInstances"] = total
    description = clean(_text(header, "StudyDescription"))
    if description:
        study["description"] = description
    study["series"] = series_out
    bundle = TransactionBundle()
    bundle.add(patient)
    bundle.add(study)
    return bundle.build()


def _series(s: Json, tz: str) -> Json | None:
    uid = str(s.get("uid", ""))
    if not UID_RE.fullmatch(uid) or len(uid) > 64:
        return None
    h: Json = s.get("header") or {}
    modality = _code(_text(h, "Modality")) or "OT"  # OT "other": ImagingStudy.series.modality is required
    out: Json = {"uid": uid}
    number = _unsigned(_text(h, "SeriesNumber"))
    if number is not None:
        out["number"] = number
    out["modality"] = {"system": DCM, "code": modality}
    description = clean(_text(h, "SeriesDescription"))
    if description:
        out["description"] = description
    instances: list[Json] = []
    for inst in s.get("instances") or []:
        iuid, cls = str(inst.get("uid", "")), str(inst.get("sop_class_uid", ""))
        if not UID_RE.fullmatch(iuid) or len(iuid) > 64 or not UID_RE.fullmatch(cls):
            continue
        item: Json = {"uid": iuid, "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{cls}"}}
        n = _unsigned(str(inst.get("number", "")))
        if n is not None:
            item["number"] = n
        instances.append(item)
    out["numberOfInstances"] = len(instances)
    started = _datetime(_text(h, "SeriesDate"), _text(h, "SeriesTime"), tz)
    if started:
        out["started"] = started
    if instances:
        out["instance"] = instances
    return out


def _patient(header: Json, calling_ae: str, study_uid: str, source: str) -> Json:
    pid = clean(_text(header, "PatientID"))
    system = hd_system(
        _text(header, "IssuerOfPatientID"),
        _text(header, "IssuerUniversalEntityID"),
        _text(header, "IssuerUniversalEntityIDType"),
    )
    if pid and system:
        key: tuple[str, ...] = ("system", system, pid)
    elif pid:
        key = ("dicom-ae", calling_ae, pid)
    else:  # no Patient ID at all: the study's own patient, so the ImagingStudy still has its required subject
        key = ("dicom-study", study_uid)
    patient: Json = {"resourceType": "Patient", "id": resource_id("Patient", *key), "meta": {"source": source}}
    if pid:
        ident: Json = {"value": pid}
        if system:
            ident = {"system": system, "value": pid}
        patient["identifier"] = [ident]
    names = _human_names(_text(header, "PatientName"))
    if names:
        patient["name"] = names
    sex = _text(header, "PatientSex").strip().upper()
    if sex:
        patient["gender"] = _GENDER.get(sex, "unknown")
    birth = _date(_text(header, "PatientBirthDate"))
    if birth:
        patient["birthDate"] = birth
    return patient


def _human_names(pn: str) -> list[Json]:
    """A DICOM PN value (already decoded from its character set) as HumanNames: one per non-empty component
    group, the ideographic and phonetic ones marked with the iso21090-EN-representation extension."""
    out: list[Json] = []
    for i, group in enumerate(pn.split("=")[:3]):
        parts = [clean(p) for p in group.split("^")] + [""] * 5
        family, given, middle, prefix, suffix = parts[:5]
        if not any((family, given, middle, prefix, suffix)):
            continue
        name: Json = {}
        if i:
            name["extension"] = [{"url": EN_REPRESENTATION, "valueCode": _REPRESENTATION[i]}]
        text = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
        name["text"] = text
        if family:
            name["family"] = family
        givens = [g for g in (given, *middle.split(" ")) if g]
        if givens:
            name["given"] = givens
        if prefix:
            name["prefix"] = [prefix]
        if suffix:
            name["suffix"] = [suffix]
        out.append(name)
    return out


def _person_text(pn: str) -> str:
    names = _human_names(pn)
    return str(names[0]["text"]) if names else ""


def _text(h: Json, key: str) -> str:
    v = h.get(key)
    return v if isinstance(v, str) else ""


def _code(value: str) -> str:
    value = value.strip()
    return value if _CODE.fullmatch(value) else ""


def _unsigned(value: str) -> int | None:
    value = value.strip()
    if value.isdigit():
        n = int(value)
        if n < 2**31:
            return n
    return None


def _date(value: str) -> str:
    m = _DATE.fullmatch(value.strip())
    if not m:
        return ""
    y, mo, d = m.groups()
    if not ("01" <= mo <= "12" and "01" <= d <= "31") or y == "0000":
        return ""
    return f"{y}-{mo}-{d}"


def _datetime(date: str, time: str, tz: str) -> str:
    """FHIR dateTime from a DICOM DA + TM + Timezone Offset From UTC; the date alone without the offset."""
    day = _date(date)
    if not day:
        return ""
    tm, zm = _TIME.fullmatch(time.strip()), _TZ.fullmatch(tz.strip())
    if tm is None or zm is None:
        return day
    hh, mm, ss, frac = tm.groups()
    if int(hh) > 23 or int(mm or 0) > 59 or int(ss or 0) > 59:
        return day
    out = f"{day}T{hh}:{mm or '00'}:{ss or '00'}"
    if frac:
        out += "." + frac
    sign, zh, zmin = zm.groups()
    return f"{out}{sign}{zh}:{zmin}"
