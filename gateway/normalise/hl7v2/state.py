"""The state of one walk over a message's segments: which patient, visit, order, report, immunization or
document the next segment belongs to. HL7 v2 groups are implicit (a segment belongs to the group opened by the
segment before it), so the maps read the message in order and keep the open group here."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.hl7v2.parse import Segment

from .bundle import TransactionBundle
from .common import Scope
from .datatypes import Json


@dataclass(slots=True)
class State:
    scope: Scope
    bundle: TransactionBundle
    message_type: str
    trigger: str
    patient: Json | None = None
    encounter: Json | None = None
    order: Json | None = None  # the ServiceRequest opened by ORC/OBR (orders)
    order_key: tuple[str, ...] = ()  # the business key of the open order (ORC/OBR numbers)
    report: Json | None = None  # the DiagnosticReport opened by OBR (results)
    immunization: Json | None = None  # the Immunization opened by RXA
    document: Json | None = None  # the DocumentReference opened by TXA
    appointment: Json | None = None  # the Appointment opened by SCH
    last: Json | None = None  # the resource an NTE annotates
    document_text: list[str] = field(default_factory=list)  # MDM: OBX text lines of the open document
    specimens: list[Json] = field(default_factory=list)  # specimens of the open order/report
    pending_orc: Segment | None = None  # the ORC of the open order group, until its OBR (or the group) ends
    pending_index: int = 0  # the pending ORC's position, for error messages

    def patient_ref(self) -> Json | None:
        return {"reference": f"Patient/{self.patient['id']}"} if self.patient is not None else None

    def encounter_ref(self) -> Json | None:
        return {"reference": f"Encounter/{self.encounter['id']}"} if self.encounter is not None else None
