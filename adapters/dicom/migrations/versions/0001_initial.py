"""DICOM study index: dicom_instances and dicom_studies.

Revision ID: d0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "d0001"
down_revision = None
branch_labels = None
depends_on = None

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "dicom_instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False, comment="of the current dataset's bytes"),
        sa.Column("path", sa.Text, nullable=False, comment="the current file"),
        sa.Column("message_id", sa.String(36), nullable=False, comment="the journal message of the current file"),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("header", LongText, nullable=False, comment="header attributes (JSON) for the study summary"),
    )
    op.create_index("ix_dicom_instances_study", "dicom_instances", ["study_instance_uid"])
    op.create_table(
        "dicom_studies",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("last_received_at", Timestamp, nullable=False),
        sa.Column("change_seq", sa.Integer, nullable=False, comment="bumped on every new or replaced instance"),
        sa.Column("emitted_seq", sa.Integer, nullable=False, server_default="0", comment="change_seq last summarised"),
        sa.Column("pending", sa.Boolean, nullable=False, comment="changed since the last summary"),
        sa.Column("emitted_at", Timestamp, nullable=True),
    )
    op.create_index("ix_dicom_studies_pending", "dicom_studies", ["pending", "last_received_at"])


def downgrade() -> None:
    op.drop_table("dicom_studies")
    op.drop_table("dicom_instances")
