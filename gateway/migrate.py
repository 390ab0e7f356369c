"""Alembic migrations run programmatically, over an async engine, for the journal and for SQL sinks.

Each schema (the journal, the SQL resource store) has its own script directory and its own version table, so
they can live in one database or in two.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from gateway.db import Database


def alembic_config(script_location: Path, version_table: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["version_table"] = version_table
    return cfg


async def upgrade(db: Database, script_location: Path, version_table: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``. Safe to run at every start and from several instances: Alembic records
    the applied revision in ``version_table``."""
    cfg = alembic_config(script_location, version_table)

    def run(conn: Connection) -> None:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

    await db.transaction(run)


async def current(db: Database, version_table: str) -> str | None:
    """The applied revision, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    def read(conn: Connection) -> str | None:
        ctx = MigrationContext.configure(conn, opts={"version_table": version_table})
        return ctx.get_current_revision()

    return await db.read(read)


def run_migrations_from_env() -> None:
    """The body of every script directory's env.py: migrate on the connection the caller handed over."""
    from alembic import context

    cfg = context.config
    conn = cfg.attributes["connection"]
    context.configure(connection=conn, version_table=cfg.attributes["version_table"], render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
