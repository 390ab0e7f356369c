"""FHIR REST destination: transaction bundles (or one PUT per resource) to a FHIR server."""
