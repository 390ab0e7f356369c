"""MLLP (Minimal Lower Layer Protocol): HL7 v2 over TCP."""
