"""Journal tables (SQLAlchemy Core). The Alembic migrations in ``migrations/versions`` create exactly these;
tests/integration/test_journal.py checks that the two agree."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

metadata = MetaData()

# MySQL: BLOB holds 64 KB, so raw messages and bundles need LONGBLOB; DATETIME needs fsp=6 for microseconds.
Blob = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "messages",
    metadata,
    Column("id", String(36), primary_key=True, comment="UUIDv7 of the envelope"),
    Column("source", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("peer", String(255), nullable=False),
    Column("received_at", Timestamp, nullable=False),
    Column("committed_at", Timestamp, nullable=False),
    Column("raw", Blob, nullable=False, comment="the bytes exactly as received"),
    Column("meta", Text, nullable=False, comment="protocol header fields as JSON (no PHI)"),
    Column("message_type", String(32), nullable=False, server_default=""),
    Column("control_id", String(199), nullable=False, server_default=""),
    Column("status", String(16), nullable=False, comment="accepted | not_mapped | quarantined"),
    Column("reject_code", String(32), nullable=True),
    Column("error", Text, nullable=True),
    Column("fhir", Blob, nullable=True, comment="the mapped FHIR transaction Bundle (JSON)"),
    Column("dedup_key", String(255), nullable=True),
)
Index("ix_messages_received_at", messages.c.received_at)
Index("ix_messages_status", messages.c.status, messages.c.received_at)
Index("ix_messages_control_id", messages.c.control_id)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("message_id", String(36), ForeignKey("messages.id"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("status", String(16), nullable=False, comment="pending | done | dead | dropped"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Timestamp, nullable=False),
    Column("lease_until", Timestamp, nullable=True),
    Column("ordering_key", String(128), nullable=False, server_default=""),
    Column("last_error", Text, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)
Index("ix_outbox_due", outbox.c.destination, outbox.c.status, outbox.c.next_attempt_at)
Index("ix_outbox_message", outbox.c.message_id)
Index("ix_outbox_order", outbox.c.destination, outbox.c.ordering_key, outbox.c.status, outbox.c.id)
Index("ix_outbox_status", outbox.c.status, outbox.c.destination)

dedup_keys = Table(
    "dedup_keys",
    metadata,
    Column("dedup_key", String(255), primary_key=True),
    Column("message_id", String(36), nullable=False),
    Column("expires_at", Timestamp, nullable=False),
)
Index("ix_dedup_keys_expires_at", dedup_keys.c.expires_at)
