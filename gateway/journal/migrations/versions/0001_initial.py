"""Journal tables: messages, outbox, dedup_keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.String(36), primary_key=True, comment="UUIDv7 of the envelope"),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("peer", sa.String(255), nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("committed_at", Timestamp, nullable=False),
        sa.Column("raw", Blob, nullable=False, comment="the bytes exactly as received"),
        sa.Column("meta", sa.Text, nullable=False, comment="protocol header fields as JSON (no PHI)"),
        sa.Column("message_type", sa.String(32), nullable=False, server_default=""),
        sa.Column("control_id", sa.String(199), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False, comment="accepted | not_mapped | quarantined"),
        sa.Column("reject_code", sa.String(32), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("fhir", Blob, nullable=True, comment="the mapped FHIR transaction Bundle (JSON)"),
        sa.Column("dedup_key", sa.String(255), nullable=True),
    )
    op.create_index("ix_messages_received_at", "messages", ["received_at"])
    op.create_index("ix_messages_status", "messages", ["status", "received_at"])
    op.create_index("ix_messages_control_id", "messages", ["control_id"])
    op.create_table(
        "outbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(36), sa.ForeignKey("messages.id"), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, comment="pending | done | dead"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", Timestamp, nullable=False),
        sa.Column("lease_until", Timestamp, nullable=True),
        sa.Column("ordering_key", sa.String(128), nullable=False, server_default=""),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_index("ix_outbox_due", "outbox", ["destination", "status", "next_attempt_at"])
    op.create_index("ix_outbox_message", "outbox", ["message_id"])
    op.create_table(
        "dedup_keys",
        sa.Column("dedup_key", sa.String(255), primary_key=True),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
    )
    op.create_index("ix_dedup_keys_expires_at", "dedup_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_table("dedup_keys")
    op.drop_table("outbox")
    op.drop_table("messages")
