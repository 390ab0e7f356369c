"""The transaction Bundle a mapping returns: one PUT per resource, keyed by its deterministic id."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from .. import MapContext

# Characters a URI may hold unescaped (RFC 3986 reserved + unreserved), so a source name stays readable.
_URI_SAFE = ":/?#[]@!$&'()*+,;=-._~"


def meta_for(ctx: MapContext) -> str:
    """meta.source for every resource of one message: ``<source name>#<envelope id>``, which tells an operator
    which source and which journalled message last wrote the resource (FHIR: "may include a #fragment to
    identify the specific request")."""
    return quote(ctx.source, safe=_URI_SAFE.replace("#", "")) + "#" + quote(ctx.message_id, safe="")


def full_url(resource_type: str, resource_id: str) -> str:
    """A stable ``urn:uuid:`` fullUrl: UUIDv5 (URL namespace) of ``<type>/<id>``."""
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{resource_type}/{resource_id}"))


class TransactionBundle:
    """Entries in insertion order; a resource whose type and id are already in the bundle is not added again
    (the first one wins: e.g. the same doctor as attending and admitting)."""

    __slots__ = ("_entries", "_seen")

    def __init__(self) -> None:
        self._entries: list[dict[str, Any]] = []
        self._seen: set[str] = set()

    def add(self, resource: dict[str, Any]) -> None:
        url = f"{resource['resourceType']}/{resource['id']}"
        if url in self._seen:
            return
        self._seen.add(url)
        self._entries.append(
            {
                "fullUrl": full_url(resource["resourceType"], resource["id"]),
                "resource": resource,
                "request": {"method": "PUT", "url": url},
            }
        )

    def build(self) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction", "entry": self._entries}
