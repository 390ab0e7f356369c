"""Optional strict validation of HL7 v2 messages against the standard's message structures, with hl7apy.

hl7apy checks what the fast tokenizer does not: segment order and groups, required segments and fields, and
data type lengths for the message's version. It costs about 20 ms per 1 KB message, so it is off by default
(``[normalise] hl7_strict = true`` turns it on) and runs in a worker thread. Real-world feeds often break the
structure in harmless ways (Z-segments, extra fields), which strict mode rejects with AR.
"""

from __future__ import annotations

import re

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from gateway.errors import PermanentError

# hl7apy's messages that name only structure (element names), never data: safe to put in an AR and a log.
_STRUCTURAL = re.compile(
    r"^(Missing required child|Cannot instantiate an unknown Element|Invalid child)[\w .:-]{0,80}$"
)


class StrictValidationError(PermanentError):
    """The message does not follow the standard structure of its type and version."""


def validate_strict(text: str) -> None:
    """Raise StrictValidationError when hl7apy's strict validation refuses the message. The reason names
    the failed rule and the element, never a field value (patient data stays out of ACKs and logs)."""
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        message.validate()
    except Exception as exc:  # hl7apy raises a dozen unrelated types; every one means "not valid"
        detail = str(exc).strip()
        reason = f"strict HL7 validation failed ({type(exc).__name__}"
        reason += f": {detail})" if _STRUCTURAL.match(detail) else ")"
        raise StrictValidationError(reason) from None
