"""DICOM -> FHIR R4: the two payloads a DICOM source journals, and Patient + ImagingStudy from a study.

A DICOM source does not put pixel data into the journal. It writes each received instance to a file (fsynced)
under its storage directory first, then journals an *instance descriptor*: a small JSON document naming that
file, its SHA-256 and size, the transfer syntax, the AE titles, and the header attributes the mapping needs,
already decoded with the dataset's Specific Character Set. The raw bytes stay byte for byte in the file; the
journal row stays a few kilobytes however large the image (a CT series is hundreds of megabytes: as journal
rows it would multiply the database's size and every group commit's write).

Instances are not mapped one by one: a study's instances arrive over seconds or minutes, and a downstream EHR
wants one ImagingStudy, not one update per image. The source aggregates them and, once a study has been quiet
for a while, journals a *study summary* (every series and instance received so far, with the patient and study
attributes of the latest instance); that message is mapped to a Patient and an ImagingStudy. More instances
later produce a new summary and an update of the same resources (ids are deterministic).
"""

from __future__ import annotations

from typing import Any

INSTANCE_FORMAT = "gateway.dicom.instance/1"
STUDY_FORMAT = "gateway.dicom.study/1"

# The header attributes a descriptor carries (keyword -> text value, decoded), chosen for the mapping and for
# operators. Patient-level ones are PHI: they live in the payload (like an HL7 PID segment), never in meta.
HEADER_KEYWORDS: tuple[str, ...] = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "TimezoneOffsetFromUTC",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "InstitutionName",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "Modality",
    "BodyPartExamined",
    "InstanceNumber",
)

# Values of the kinds of descriptor ``policy`` field: what the source did about an earlier instance with the
# same SOP Instance UID.
POLICY_NEW = "new"  # first time this SOP Instance UID is seen
POLICY_IDENTICAL = "identical"  # same UID, same bytes: a resend (the journal's dedup key answers it)
POLICY_OVERWRITE = "overwrite"  # same UID, other bytes, policy overwrite: this one replaces the earlier one
POLICY_KEPT = "kept"  # same UID, other bytes, policy keep: stored aside, the earlier one stays current
POLICY_REJECTED = "rejected"  # same UID, other bytes, policy reject: stored aside, quarantined, refused

Json = dict[str, Any]
