"""Study index tables (its own Alembic chain, version table ``gateway_dicom_version``). The migrations in
``migrations/versions`` create exactly these; tests/integration/test_dicom_index.py checks that they agree."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql

from gateway.journal.schema import Timestamp

metadata = MetaData()
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

instances = Table(
    "dicom_instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("sha256", String(64), nullable=False, comment="of the current dataset's bytes"),
    Column("path", Text, nullable=False, comment="the current file"),
    Column("message_id", String(36), nullable=False, comment="the journal message of the current file"),
    Column("source", String(64), nullable=False),
    Column("received_at", Timestamp, nullable=False),
    Column("header", LongText, nullable=False, comment="header attributes (JSON) for the study summary"),
)
Index("ix_dicom_instances_study", instances.c.study_instance_uid)

studies = Table(
    "dicom_studies",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("source", String(64), nullable=False),
    Column("last_received_at", Timestamp, nullable=False),
    Column("change_seq", Integer, nullable=False, comment="bumped on every new or replaced instance"),
    Column("emitted_seq", Integer, nullable=False, server_default="0", comment="change_seq last summarised"),
    Column("pending", Boolean, nullable=False, comment="changed since the last summary"),
    Column("emitted_at", Timestamp, nullable=True),
)
Index("ix_dicom_studies_pending", studies.c.pending, studies.c.last_received_at)
