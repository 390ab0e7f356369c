"""Resource store tables: fhir_resources (current version) and fhir_resource_history.

Revision ID: s0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "s0001"
down_revision = None
branch_labels = None
depends_on = None

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "fhir_resources",
        sa.Column("resource_type", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("last_updated", Timestamp, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False, comment="SHA-256 of the resource without meta"),
        sa.Column("message_id", sa.String(36), nullable=False, comment="the journal message that wrote this version"),
        sa.Column("json", LongText, nullable=False),
    )
    op.create_index("ix_fhir_resources_last_updated", "fhir_resources", ["last_updated"])
    op.create_table(
        "fhir_resource_history",
        sa.Column("resource_type", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("last_updated", Timestamp, nullable=False),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("json", LongText, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fhir_resource_history")
    op.drop_table("fhir_resources")
