"""Message ids (UUIDv7) and deterministic resource ids."""

from __future__ import annotations

import time
import uuid

from gateway.ids import resource_id, uuid7


def test_uuid7_is_version_7_time_ordered_and_unique() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(50_000)]
    after = time.time_ns() // 1_000_000
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    first = uuid.UUID(ids[0])
    assert first.version == 7 and first.variant == uuid.RFC_4122
    assert before <= first.int >> 80 <= after + 1


def test_resource_ids_are_deterministic_and_separate_their_parts() -> None:
    assert resource_id("Patient", "HOSP", "123") == resource_id("Patient", "HOSP", "123")
    assert resource_id("Patient", "HOSP", "123") != resource_id("Encounter", "HOSP", "123")
    assert resource_id("Patient", "HOSP1", "23") != resource_id("Patient", "HOSP", "123")
    rid = resource_id("Patient", "x")
    assert len(rid) == 32 and all(c in "0123456789abcdef" for c in rid)
