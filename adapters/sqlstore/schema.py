"""Resource store tables. The migrations in ``migrations/versions`` create exactly these."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects import mysql

from gateway.journal.schema import Timestamp

metadata = MetaData()
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

resources = Table(
    "fhir_resources",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_updated", Timestamp, nullable=False),
    Column("content_hash", String(64), nullable=False, comment="SHA-256 of the resource without meta"),
    Column("message_id", String(36), nullable=False, comment="the journal message that wrote this version"),
    Column("json", LongText, nullable=False),
    # Search columns, written by the sink from the resource (adapters/sqlstore/search.py); indexed by s0002/s0003.
    Column("identifier_system", String(255), nullable=True),
    Column("identifier_value", String(128), nullable=True),
    Column("subject_ref", String(128), nullable=True),
    Column("code_system", String(255), nullable=True),
    Column("code", String(64), nullable=True),
    Column("effective", String(35), nullable=True),
)
Index("ix_fhir_resources_last_updated", resources.c.last_updated)

history = Table(
    "fhir_resource_history",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("last_updated", Timestamp, nullable=False),
    Column("message_id", String(36), nullable=False),
    Column("json", LongText, nullable=False),
)
