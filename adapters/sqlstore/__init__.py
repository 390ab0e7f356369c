"""The SQL resource store sink: FHIR resources upserted by type and id, with version history."""
