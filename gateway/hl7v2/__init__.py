"""HL7 v2: tokenizer (parse) and acknowledgements (ack)."""

from gateway.hl7v2.parse import Encoding, Field, HL7ParseError, Message, Segment, decode, parse, unescape

__all__ = ["Encoding", "Field", "HL7ParseError", "Message", "Segment", "decode", "parse", "unescape"]
