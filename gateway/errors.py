"""The gateway's error hierarchy.

Library exceptions are translated at the adapter boundary (``raise TransientError(...) from exc``) so the core
only ever decides between "the sender should retry" and "the sender must not retry".
"""


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration (or a rule set) is invalid; ``path`` names the offending key when known."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class TransientError(GatewayError):
    """A failure that may go away by itself: retry later (HL7 AE, DICOM 0xA700, no PUBACK)."""


class PermanentError(GatewayError):
    """A failure that will recur on every retry: do not retry (HL7 AR, DICOM 0xCxxx, quarantine)."""


class UnavailableError(TransientError):
    """A dependency (database, broker, downstream server) cannot be reached at all, as opposed to refusing one
    particular item."""
