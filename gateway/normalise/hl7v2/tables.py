"""HL7 v2 vocabulary tables and their FHIR R4 maps, from the HL7 v2-to-FHIR IG concept maps
(mappings/codesystems/*.csv). Values a table does not list are not guessed: the caller keeps the sender's code
without a mapped coding."""

from __future__ import annotations

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

# HL7 table 0203 (identifier type): code -> display, as in the IG's IdentifierType map (NNxxx left out: a
# pattern).
IDENTIFIER_TYPE: dict[str, str] = {
    "ACSN": "Accession ID",
    "AM": "American Express",
    "AMA": "American Medical Association Number",
    "AN": "Account number",
    "ANON": "Anonymous identifier",
    "ANC": "Account number Creditor",
    "AND": "Account number debitor",
    "ANT": "Temporary Account Number",
    "APRN": "Advanced Practice Registered Nurse number",
    "ASID": "Ancestor Specimen ID",
    "BA": "Bank Account Number",
    "BC": "Bank Card Number",
    "BCT": "Birth Certificate",
    "BR": "Birth registry number",
    "BRN": "Breed Registry Number",
    "BSNR": "Primary physician office number",
    "CC": "Cost Center number",
    "CONM": "Change of Name Document",
    "CZ": "Citizenship Card",
    "CY": "County number",
    "DDS": "Dentist license number",
    "DEA": "Drug Enforcement Administration registration number",
    "DI": "Diner's Club card",
    "DFN": "Drug Furnishing or prescriptive authority Number",
    "DL": "Driver's license number",
    "DN": "Doctor number",
    "DO": "Osteopathic License number",
    "DP": "Diplomatic Passport",
    "DPM": "Podiatrist license number",
    "DR": "Donor Registration Number",
    "DS": "Discover Card",
    "EI": "Employee number",
    "EN": "Employer number",
    "ESN": "Staff Enterprise Number",
    "FI": "Facility ID",
    "GI": "Guarantor internal identifier",
    "GL": "General ledger number",
    "GN": "Guarantor external identifier",
    "HC": "Health Card Number",
    "JHN": "Jurisdictional health number (Canada)",
    "IND": "Indigenous/Aboriginal",
    "LACSN": "Laboratory Accession ID",
    "LANR": "Lifelong physician number",
    "LI": "Labor and industries number",
    "LN": "License number",
    "LR": "Local Registry ID",
    "MA": "Patient Medicaid number",
    "MB": "Member Number",
    "MC": "Patient's Medicare number",
    "MCD": "Practitioner Medicaid number",
    "MCN": "Microchip Number",
    "MCR": "Practitioner Medicare number",
    "MCT": "Marriage Certificate",
    "MD": "Medical License number",
    "MI": "Military ID number",
    "MR": "Medical record number",
    "MRT": "Temporary Medical Record Number",
    "MS": "MasterCard",
    "NBSNR": "Secondary physician office number",
    "NCT": "Naturalization Certificate",
    "NE": "National employer identifier",
    "NH": "National Health Plan Identifier",
    "NI": "National unique individual identifier",
    "NII": "National Insurance Organization Identifier",
    "NIIP": "National Insurance Payor Identifier (Payor)",
    "NP": "Nurse practitioner number",
    "NPI": "National provider identifier",
    "OD": "Optometrist license number",
    "PA": "Physician Assistant number",
    "PC": "Parole Card",
    "PCN": "Penitentiary/correctional institution Number",
    "PE": "Living Subject Enterprise Number",
    "PEN": "Pension Number",
    "PI": "Patient internal identifier",
    "PN": "Person number",
    "PNT": "Temporary Living Subject Number",
    "PPIN": "Medicare/CMS Performing Provider Identification Number",
    "PPN": "Passport number",
    "PRC": "Permanent Resident Card Number",
    "PRN": "Provider number",
    "PT": "Patient external identifier",
    "QA": "QA number",
    "RI": "Resource identifier",
    "RPH": "Pharmacist license number",
    "RN": "Registered Nurse Number",
    "RR": "Railroad Retirement number",
    "RRI": "Regional registry ID",
    "RRP": "Railroad Retirement Provider",
    "SID": "Specimen ID",
    "SL": "State license",
    "SN": "Subscriber Number",
    "SP": "Study Permit",
    "SR": "State registry ID",
    "SS": "Social Security number",
    "TAX": "Tax ID number",
    "TN": "Treaty Number/ (Canada)",
    "TPR": "Temporary Permanent Resident (Canada)",
    "U": "Unspecified identifier",
    "UPIN": "Medicare/CMS (formerly HCFA)'s Universal Physician Identification numbers",
    "USID": "Unique Specimen ID",
    "VN": "Visit number",
    "VP": "Visitor Permit",
    "VS": "VISA",
    "WC": "WIC identifier",
    "WCN": "Workers' Comp Number",
    "WP": "Work Permit",
    "XX": "Organization identifier",
}

# Table 0001 administrative sex -> FHIR administrative-gender (IG map AdministrativeSex).
ADMINISTRATIVE_SEX: dict[str, str] = {
    "F": "female",
    "M": "male",
    "O": "other",
    "U": "unknown",
    "A": "other",
    "N": "other",
}

# Table 0200 name type -> FHIR name-use (IG map NameType; codes without a FHIR equivalent are left out).
NAME_USE: dict[str, str] = {
    "BAD": "old",
    "D": "usual",
    "L": "official",
    "M": "maiden",
    "MSK": "anonymous",
    "N": "nickname",
    "NAV": "temp",
    "R": "official",
    "TEMP": "temp",
}

# Table 0190 address type -> FHIR address-use / address-type (IG maps AddressType[Use] and AddressType[Type]).
ADDRESS_USE: dict[str, str] = {
    "BA": "old",
    "BI": "billing",
    "C": "temp",
    "B": "work",
    "H": "home",
    "O": "work",
}
ADDRESS_TYPE: dict[str, str] = {"M": "postal", "SH": "postal"}

# Table 0201 telecommunication use -> FHIR contact-point-use (IG map TelecommunicationUseCode).
TELECOM_USE: dict[str, str] = {"PRN": "home", "WPN": "work", "PRS": "mobile"}

# Table 0202 telecommunication equipment type -> FHIR contact-point-system (IG map
# TelecommunicationEquipmentType; the IG maps CP to the *use* "mobile", so CP is a phone whose use is mobile).
TELECOM_SYSTEM: dict[str, str] = {
    "PH": "phone",
    "FX": "fax",
    "MD": "other",
    "CP": "phone",
    "SAT": "other",
    "BP": "pager",
    "Internet": "email",
    "X.400": "email",
    "TDD": "other",
    "TTY": "other",
}

# Table 0002 marital status -> (system, code, display) (IG map MaritalStatus).
_V3_MS = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
_V3_NF = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
MARITAL_STATUS: dict[str, tuple[str, str, str]] = {
    "A": (_V3_MS, "L", "Legally Separated"),
    "D": (_V3_MS, "D", "Divorced"),
    "M": (_V3_MS, "M", "Married"),
    "S": (_V3_MS, "S", "Never Married"),
    "W": (_V3_MS, "W", "Widowed"),
    "C": (_V3_MS, "C", "Common Law"),
    "G": (_V3_MS, "T", "Domestic partner"),
    "P": (_V3_MS, "T", "Domestic partner"),
    "R": (_V3_MS, "T", "Domestic partner"),
    "E": (_V3_MS, "L", "Legally Separated"),
    "N": (_V3_MS, "A", "Annulled"),
    "I": (_V3_MS, "I", "Interlocutory"),
    "B": (_V3_MS, "U", "unmarried"),
    "U": (_V3_NF, "UNK", "Unknown"),
    "O": (_V3_NF, "OTH", "Other"),
    "T": (_V3_NF, "NAVU", "Not available"),
}

# Table 0004 patient class -> Encounter.class (IG map PatientClass[EncounterClass]).
_V3_ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_V2_0004 = "http://terminology.hl7.org/CodeSystem/v2-0004"
PATIENT_CLASS: dict[str, tuple[str, str, str]] = {
    "E": (_V3_ACT, "EMER", "emergency"),
    "I": (_V3_ACT, "IMP", "inpatient encounter"),
    "O": (_V3_ACT, "AMB", "ambulatory"),
    "P": (_V3_ACT, "PRENC", "pre-admission"),
    "R": (_V2_0004, "R", "Recurring patient"),
    "B": (_V2_0004, "B", "Obstetrics"),
    "C": (_V2_0004, "C", "Commercial Account"),
    "N": (_V2_0004, "N", "Not Applicable"),
    "U": (_V2_0004, "U", "Unknown"),
}
# Encounter.class is mandatory in R4: an absent PV1-2 becomes the null flavour "unknown".
UNKNOWN_CLASS: tuple[str, str, str] = (_V3_NF, "UNK", "unknown")

# Table 0007 admission type (IG map AdmissionType: the v2 table itself).
_V2_0007 = "http://terminology.hl7.org/CodeSystem/v2-0007"
ADMISSION_TYPE: dict[str, tuple[str, str, str]] = {
    code: (_V2_0007, code, display)
    for code, display in (
        ("A", "Accident"),
        ("E", "Emergency"),
        ("L", "Labor and Delivery"),
        ("R", "Routine"),
        ("N", "Newborn (Birth in healthcare facility)"),
        ("U", "Urgent"),
        ("C", "Elective"),
    )
}

# Table 0136 yes/no indicator (IG map YesNoIndicator).
YES_NO: dict[str, bool] = {"Y": True, "N": False}

# PV1 doctor fields -> Encounter.participant.type (v3 ParticipationType), as the IG's PV1[Encounter] map
# assigns.
V3_PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
PV1_PARTICIPANTS: tuple[tuple[int, str, str], ...] = (
    (7, "ATND", "attender"),
    (8, "REF", "referrer"),
    (9, "CON", "consultant"),
    (17, "ADM", "admitter"),
)

# Table 0396 coding system names -> FHIR code system URIs, for the names senders use in ADT. HL7nnnn names are
# handled by rule (v2 table nnnn); names not listed here give a coding without a system rather than a guess.
CODING_SYSTEMS: dict[str, str] = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "UCUM": "http://unitsofmeasure.org",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "MVX": "http://hl7.org/fhir/sid/mvx",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT4": "http://www.ama-assn.org/go/cpt",
    "CDCREC": "urn:oid:2.16.840.1.113883.6.238",
    "ISO3166_1": "urn:iso:std:iso:3166",
    "NUCC": "http://nucc.org/provider-taxonomy",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm",
    "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "SNOMED": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "LOINC": "http://loinc.org",
    "ANS+": "http://unitsofmeasure.org",
}

# Assigning authorities (HD-1, table 0363 and common usage) whose identifiers have a system in the FHIR
# identifier registry: the IG maps CX-4 to Identifier.system "IF CX.4 IN the identifier registry".
IDENTIFIER_REGISTRY: dict[str, str] = {
    "USSSA": "http://hl7.org/fhir/sid/us-ssn",
    "SSA": "http://hl7.org/fhir/sid/us-ssn",
    "NPI": "http://hl7.org/fhir/sid/us-npi",
}

# --- results, orders, immunizations, documents, appointments (IG concept maps) ------------------------------

# Table 0085 observation result status -> Observation.status (IG ObservationResultStatusCodesInterpretation;
# codes the IG leaves unmapped get the nearest FHIR status, documented in docs/mapping.md).
OBSERVATION_STATUS: dict[str, str] = {
    "A": "amended",
    "B": "amended",
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "I": "registered",
    "N": "cancelled",
    "O": "registered",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "U": "final",
    "V": "final",
    "W": "entered-in-error",
    "X": "cancelled",
}

# Table 0123 result status -> DiagnosticReport.status (IG ResultStatus[Non-Queries]).
REPORT_STATUS: dict[str, str] = {
    "O": "registered",
    "I": "registered",
    "S": "partial",
    "A": "partial",
    "P": "preliminary",
    "C": "corrected",
    "R": "partial",
    "F": "final",
    "X": "cancelled",
    "M": "amended",
}

# Table 0038 order status -> ServiceRequest.status (IG OrderStatus) and table 0119 order control codes for
# messages without ORC-5 (IG OrderControlCode[ServiceRequest.status]).
ORDER_STATUS: dict[str, str] = {
    "A": "active",
    "CA": "revoked",
    "CM": "completed",
    "DC": "revoked",
    "ER": "entered-in-error",
    "HD": "on-hold",
    "IP": "active",
    "RP": "revoked",
    "SC": "active",
}
ORDER_CONTROL_STATUS: dict[str, str] = {
    "AF": "active",
    "CA": "active",
    "CR": "revoked",
    "DC": "revoked",
    "DF": "revoked",
    "DR": "revoked",
    "HD": "active",
    "HR": "on-hold",
    "NW": "active",
    "OC": "revoked",
    "OD": "revoked",
    "OH": "on-hold",
    "OK": "active",
    "PR": "active",
    "PY": "active",
    "RL": "active",
    "RO": "active",
    "RQ": "active",
    "SC": "active",
    "SN": "active",
    "XO": "active",
}
# ORC-7.6 / TQ1-9 priority (table 0485) -> request-priority.
PRIORITY: dict[str, str] = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "C": "urgent", "T": "urgent"}

# Table 0127 allergen type -> AllergyIntolerance.category; table 0128 severity -> criticality (IG maps).
ALLERGY_CATEGORY: dict[str, str] = {
    "DA": "medication",
    "FA": "food",
    "EA": "environment",
    "AA": "biologic",
    "PA": "environment",
    "LA": "environment",
}
ALLERGY_CRITICALITY: dict[str, str] = {"SV": "high", "MO": "low", "MI": "low", "U": "unable-to-assess"}
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"

# Table 0078 interpretation codes that exist in v3 ObservationInterpretation (IG InterpretationCodes).
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
INTERPRETATION: frozenset[str] = frozenset(
    [
        "<",
        ">",
        "A",
        "AA",
        "B",
        "CAR",
        "D",
        "DET",
        "E",
        "EX",
        "EXP",
        "H",
        "HH",
        "HU",
        "I",
        "IE",
        "IND",
        "L",
        "LL",
        "LU",
        "MS",
        "N",
        "NCL",
        "ND",
        "NEG",
        "NR",
        "NS",
        "POS",
        "R",
        "RR",
        "S",
        "SDD",
        "SYN-R",
        "SYN-S",
        "U",
        "VS",
        "UNE",
        "W",
        "WR",
    ]
)

# Table 0322 completion status -> Immunization.status (IG CompletionStatus).
IMMUNIZATION_STATUS: dict[str, str] = {"CP": "completed", "PA": "completed", "RE": "not-done", "NA": "not-done"}

# Table 0278 filler status -> Appointment.status (IG FillerStatusCodes[Appointment]); unmapped filler statuses
# fall back to the trigger event.
APPOINTMENT_STATUS: dict[str, str] = {
    "PENDING": "pending",
    "WAITLIST": "waitlist",
    "BOOKED": "booked",
    "STARTED": "checked-in",
    "COMPLETE": "fulfilled",
    "CANCELLED": "cancelled",
    "DISCONTINUED": "cancelled",
    "DELETED": "entered-in-error",
    "NOSHOW": "noshow",
    "OVERBOOK": "booked",
}
APPOINTMENT_EVENT_STATUS: dict[str, str] = {
    "S12": "booked",
    "S13": "booked",
    "S14": "booked",
    "S15": "cancelled",
}

# Table 0271 document completion status -> DocumentReference.docStatus.
DOCUMENT_STATUS: dict[str, str] = {
    "AU": "final",
    "LA": "final",
    "DO": "final",
    "DI": "preliminary",
    "IP": "preliminary",
    "IN": "preliminary",
    "PA": "preliminary",
}

# The trigger events' Encounter.status (IG Event[EncounterStatus], where the event decides it).
EVENT_ENCOUNTER_STATUS: dict[str, str] = {
    "A03": "finished",
    "A05": "planned",
    "A11": "cancelled",
    "A13": "in-progress",
    "A14": "planned",
    "A38": "cancelled",
}

V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0063 = "http://terminology.hl7.org/CodeSystem/v2-0063"
V2_0443 = "http://terminology.hl7.org/CodeSystem/v2-0443"
V2_0003 = "http://terminology.hl7.org/CodeSystem/v2-0003"
V2_0078 = "http://terminology.hl7.org/CodeSystem/v2-0078"
