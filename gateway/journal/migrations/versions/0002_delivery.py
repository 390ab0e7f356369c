"""Delivery: indexes for FIFO claims per ordering key, dead-letter listings and retention purges.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A FIFO claim asks "is there an earlier pending item with this key for this destination?" per candidate.
    op.create_index("ix_outbox_order", "outbox", ["destination", "ordering_key", "status", "id"])
    # `gateway dlq list` and `gateway status` count and list by status without scanning delivered rows.
    op.create_index("ix_outbox_status", "outbox", ["status", "destination"])


def downgrade() -> None:
    op.drop_index("ix_outbox_status", "outbox")
    op.drop_index("ix_outbox_order", "outbox")
