"""DICOM: the C-STORE receiver (source), its study aggregation, and the C-STORE forward sink."""
