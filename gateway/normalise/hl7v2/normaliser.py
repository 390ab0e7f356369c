"""The HL7 v2 normaliser: parse, check the header, map to FHIR, and the default dedup key."""

from __future__ import annotations

import hashlib
import re

from gateway.contracts import Envelope, RejectCode
from gateway.hl7v2.parse import HL7ParseError, Message, decode, parse

from .. import MapContext, MappingError, Prepared, Rejected
from . import map_hl7v2
from .settings import DEFAULT_SETTINGS, MappingSettings

# HL7 v2 versions we read (MSH-12.1). Anything else is answered AR 203 "unsupported version id".
SUPPORTED_HL7_VERSIONS = frozenset(
    ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9"]
)

_SEGMENT_BREAK = re.compile(r"\r\n|\n|\r")

# Messages larger than this are parsed and mapped in a worker thread so the event loop keeps serving.
EXECUTOR_THRESHOLD = 256 * 1024


class Hl7v2Normaliser:
    """``settings``: the configured identifier systems, coding systems, code maps and default zone."""

    def __init__(self, *, strict: bool = False, settings: MappingSettings = DEFAULT_SETTINGS) -> None:
        self.strict = strict
        self.settings = settings

    def offload(self, env: Envelope) -> bool:
        return self.strict or len(env.payload) > EXECUTOR_THRESHOLD

    def prepare(self, env: Envelope) -> Prepared:
        try:
            msg = parse(env.payload)
        except HL7ParseError as exc:
            raise Rejected(RejectCode.NO_HEADER if exc.no_header else RejectCode.UNPARSEABLE, str(exc)) from None
        meta = hl7_meta(msg)
        if msg.version not in SUPPORTED_HL7_VERSIONS:
            raise Rejected(RejectCode.UNSUPPORTED_VERSION, "unsupported HL7 version in MSH-12", meta)
        if not msg.message_type:
            raise Rejected(RejectCode.UNSUPPORTED_TYPE, "MSH-9 message type is missing", meta)
        if self.strict:
            from gateway.hl7v2.strict import StrictValidationError, validate_strict

            try:
                validate_strict(_SEGMENT_BREAK.sub("\r", decode(env.payload).lstrip("\ufeff").strip()))
            except StrictValidationError as exc:
                raise Rejected(RejectCode.UNPARSEABLE, str(exc), meta) from None
        ctx = MapContext(message_id=env.id, source=env.source, received_at=env.received_at)
        try:
            bundle = map_hl7v2(msg, ctx, self.settings)
        except MappingError as exc:
            raise Rejected(RejectCode.MAPPING_FAILED, f"cannot map: {exc}", meta) from None
        control_id = meta["control_id"]
        return Prepared(
            message_type=meta["message_type"],
            control_id=control_id,
            meta=meta,
            bundle=bundle,
            dedup_key=dedup_key(meta, env.payload) if control_id else None,
        )


def hl7_meta(msg: Message) -> dict[str, str]:
    """MSH fields kept as message metadata: routing and operations need them; none of them is PHI. Each is
    capped (MSH-10 at HL7's 199 characters, the others at 200) so a hostile header cannot overflow a column."""
    msh = msg.msh
    mt = msg.message_type
    trig = msg.trigger_event
    return {
        "message_type": (f"{mt}^{trig}" if trig else mt)[:32],
        "control_id": msg.control_id[:199],
        "version": msg.version[:20],
        "sending_application": msh.raw(3)[:200],
        "sending_facility": msh.raw(4)[:200],
        "receiving_application": msh.raw(5)[:200],
        "receiving_facility": msh.raw(6)[:200],
        "processing_id": msh.get(11)[:20],
    }


def dedup_key(meta: dict[str, str], payload: bytes) -> str:
    """Sending application, facility and MSH-10, plus a hash of the content without MSH-7. A resend (the same
    message, perhaps with a new MSH-7 timestamp) has the same key and is acknowledged without a second copy; a
    different message under a reused control id (a sender whose counter restarted) has another key and is
    stored, instead of being acknowledged and dropped.

    The hash is over the segments, not the bytes as framed: senders and tools differ in the segment terminator
    (CR, LF, CR LF) and in whether the last segment has one (`mllp_send` drops it, `gateway send` keeps it), and
    the same message resent by another tool must be the same message. The segments are split as the parser
    splits them (on CR when the message has one, else on LF; an LF after a CR belongs to the terminator) and
    hashed CR-terminated, which is the bytes themselves for the usual framing, so keys written by earlier
    versions still match."""
    sep = b"\r" if b"\r" in payload[:4096] else b"\n"
    segments = [seg.lstrip(b"\n") if sep == b"\r" else seg for seg in payload.split(sep)]
    segments = [seg for seg in segments if seg]
    head = segments[0] if segments else b""
    fs = head[3:4] or b"|"
    fields = head.split(fs)
    if len(fields) > 6:
        fields[6] = b""  # MSH-7 (fields[0] is "MSH", fields[1] MSH-2)
    canonical = b"\r".join([fs.join(fields), *segments[1:]]) + b"\r"
    digest = hashlib.sha256(canonical).hexdigest()[:32]
    who = f"hl7v2|{meta['sending_application']}|{meta['sending_facility']}|{meta['control_id']}"
    if len(who) > 200:  # keep the key within its column; the hash of the long part keeps it unique
        who = who[:160] + "|" + hashlib.sha256(who.encode()).hexdigest()[:32]
    return f"{who}|{digest}"
