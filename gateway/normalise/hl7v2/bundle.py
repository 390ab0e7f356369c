"""The transaction Bundle a mapping returns: one PUT per resource, keyed by its deterministic id."""

from __future__ import annotations

import hashlib
import re
import uuid
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from .. import MapContext

# Characters a URI may hold unescaped (RFC 3986 reserved + unreserved), so a source name stays readable.
_URI_SAFE = ":/?#[]@!$&'()*+,;=-._~"
# What ``quote`` never escapes (ASCII letters, digits and "_.-~"): a value made only of these is returned as
# it is, so the usual UUID message id skips the encode/scan/join round trip.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")

_NAMESPACE_URL = hashlib.sha1(uuid.NAMESPACE_URL.bytes)  # copied, then fed the name
# UUID variant bits (RFC 4122): the top two bits of the 17th hex digit become 10, i.e. 8, 9, a or b.
_VARIANT = {d: "89ab"[int(d, 16) & 0b11] for d in "0123456789abcdef"}


@lru_cache(maxsize=64)
def _quoted_source(source: str) -> str:
    # The source is a configured name: a handful of values for the life of the process.
    return quote(source, safe=_URI_SAFE.replace("#", ""))


def meta_for(ctx: MapContext) -> str:
    """meta.source for every resource of one message: ``<source name>#<envelope id>``, which tells an operator
    which source and which journalled message last wrote the resource (FHIR: "may include a #fragment to
    identify the specific request")."""
    message_id = ctx.message_id
    if not _UNRESERVED.fullmatch(message_id):
        message_id = quote(message_id, safe="")
    return _quoted_source(ctx.source) + "#" + message_id


def full_url(resource_type: str, resource_id: str) -> str:
    """A stable ``urn:uuid:`` fullUrl: UUIDv5 (URL namespace) of ``<type>/<id>``."""
    return _uuid5_urn(f"{resource_type}/{resource_id}")


def _uuid5_urn(name: str) -> str:
    """``"urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, name))``.

    Spelled out rather than ``str(uuid.uuid5(...))``, which builds a UUID object and formats it through a
    128-bit int (about 3.5 us, several times the hash): the same SHA-1 over namespace + name, its first 16
    bytes as hex, with the version nibble set to 5 and the variant bits to 10, exactly as RFC 4122 and
    ``uuid.uuid5`` do."""
    sha1 = _NAMESPACE_URL.copy()
    sha1.update(name.encode())
    h = sha1.hexdigest()
    return f"urn:uuid:{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


class TransactionBundle:
    """Entries in insertion order; a resource whose type and id are already in the bundle is not added again
    (the first one wins, e.g. the same doctor as attending and admitting, and gains only the elements it lacks)."""

    __slots__ = ("_entries", "_seen")

    def __init__(self) -> None:
        self._entries: list[dict[str, Any]] = []
        self._seen: dict[str, dict[str, Any]] = {}

    def add(self, resource: dict[str, Any]) -> None:
        url = f"{resource['resourceType']}/{resource['id']}"
        if url in self._seen:
            if resource is not self._seen[url]:
                # The same entity named twice (a doctor in PV1-7 and again in a ROL with a degree): the first
                # keeps its values, and gains the elements only the later one has.
                first = self._seen[url]
                for key, value in resource.items():
                    if key not in first:
                        first[key] = value
            return
        self._seen[url] = resource
        self._entries.append(
            {
                "fullUrl": _uuid5_urn(url),  # full_url(type, id)
                "resource": resource,
                "request": {"method": "PUT", "url": url},
            }
        )

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self._entries

    def build(self) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction", "entry": self._entries}
