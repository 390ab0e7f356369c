"""The vital signs the sensor normaliser maps, keyed by the codes a payload may use.

Each vital is known by its LOINC code (the one the FHIR R4 vital-signs profile requires) and by its IEEE 11073-10101
(MDC) code, the code bedside devices send. A payload may use either; the Observation carries both. The units are
UCUM codes; the first unit of each vital is the one its R4 profile prefers.
"""

from __future__ import annotations

from dataclasses import dataclass

LOINC = "http://loinc.org"
MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"
PROFILE_BASE = "http://hl7.org/fhir/StructureDefinition/"


@dataclass(frozen=True, slots=True)
class Vital:
    key: str  # our name, e.g. "heart-rate"
    loinc: str
    loinc_display: str
    mdc: str
    mdc_display: str
    units: tuple[str, ...]  # accepted UCUM codes
    profile: str  # the R4 vital-signs child profile
    extra_loinc: tuple[tuple[str, str], ...] = ()  # further LOINC codings (pulse oximetry SpO2)

    def coding(self) -> list[dict[str, str]]:
        out = [{"system": LOINC, "code": self.loinc, "display": self.loinc_display}]
        out += [{"system": LOINC, "code": c, "display": d} for c, d in self.extra_loinc]
        if self.mdc:
            out.append({"system": MDC, "code": self.mdc, "display": self.mdc_display})
        return out


HEART_RATE = Vital("heart-rate", "8867-4", "Heart rate", "147842", "MDC_ECG_HEART_RATE", ("/min",), "heartrate")
PULSE_RATE = Vital("pulse-rate", "8867-4", "Heart rate", "149530", "MDC_PULS_OXIM_PULS_RATE", ("/min",), "heartrate")
SPO2 = Vital(
    "oxygen-saturation",
    "2708-6",
    "Oxygen saturation in Arterial blood",
    "150456",
    "MDC_PULS_OXIM_SAT_O2",
    ("%",),
    "oxygensat",
    extra_loinc=(("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),),
)
RESP_RATE = Vital("respiratory-rate", "9279-1", "Respiratory rate", "151562", "MDC_RESP_RATE", ("/min",), "resprate")
BODY_TEMP = Vital(
    "body-temperature", "8310-5", "Body temperature", "150364", "MDC_TEMP_BODY", ("Cel", "[degF]"), "bodytemp"
)
BP_PANEL = Vital(
    "blood-pressure", "85354-9", "Blood pressure panel with all children optional", "150020",
    "MDC_PRESS_BLD_NONINV", (), "bp",
)  # fmt: skip
SYSTOLIC = Vital(
    "systolic", "8480-6", "Systolic blood pressure", "150021", "MDC_PRESS_BLD_NONINV_SYS", ("mm[Hg]",), "bp"
)
DIASTOLIC = Vital(
    "diastolic", "8462-4", "Diastolic blood pressure", "150022", "MDC_PRESS_BLD_NONINV_DIA", ("mm[Hg]",), "bp"
)
MEAN_BP = Vital("mean", "8478-0", "Mean blood pressure", "150023", "MDC_PRESS_BLD_NONINV_MEAN", ("mm[Hg]",), "bp")
BODY_WEIGHT = Vital(
    "body-weight", "29463-7", "Body weight", "188736", "MDC_MASS_BODY_ACTUAL", ("kg", "g", "[lb_av]"), "bodyweight"
)
BODY_HEIGHT = Vital(
    "body-height", "8302-2", "Body height", "188740", "MDC_LEN_BODY_ACTUAL", ("cm", "[in_i]"), "bodyheight"
)
# Inhaled oxygen flow rate: a component of a pulse oximetry Observation (US Core), not a vital of its own.
O2_FLOW = Vital("oxygen-flow", "3151-8", "Inhaled oxygen flow rate", "", "", ("L/min",), "oxygensat")

VITALS = (HEART_RATE, PULSE_RATE, SPO2, RESP_RATE, BODY_TEMP, BP_PANEL, BODY_WEIGHT, BODY_HEIGHT)
BP_COMPONENTS = (SYSTOLIC, DIASTOLIC, MEAN_BP)

# (system, code) -> Vital. A LOINC code shared by two MDC codes (heart rate) resolves to the first.
BY_CODE: dict[tuple[str, str], Vital] = {}
for _v in VITALS:
    BY_CODE.setdefault((LOINC, _v.loinc), _v)
    BY_CODE[(MDC, _v.mdc)] = _v
COMPONENT_BY_CODE: dict[tuple[str, str], Vital] = {}
for _v in BP_COMPONENTS:
    COMPONENT_BY_CODE[(LOINC, _v.loinc)] = _v
    COMPONENT_BY_CODE[(MDC, _v.mdc)] = _v
