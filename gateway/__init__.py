"""Healthcare interoperability gateway: HL7 v2, DICOM and MQTT in; FHIR R4 out; acknowledged only when durable."""

__version__ = "0.1.0"
