"""Alembic migrations run programmatically, over an async engine, for the journal and for SQL sinks.

Each schema (the journal, the SQL resource store) has its own script directory and its own version table, so
they can live in one database or in two.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine


def alembic_config(script_location: Path, version_table: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["version_table"] = version_table
    return cfg


async def upgrade(engine: AsyncEngine, script_location: Path, version_table: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``. Safe to run at every start and from several instances: Alembic records
    the applied revision in ``version_table``."""
    cfg = alembic_config(script_location, version_table)

    def run(conn: Connection) -> None:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def current(engine: AsyncEngine, version_table: str) -> str | None:
    """The applied revision, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    def read(conn: Connection) -> str | None:
        ctx = MigrationContext.configure(conn, opts={"version_table": version_table})
        return ctx.get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


def run_migrations_from_env() -> None:
    """The body of every script directory's env.py: migrate on the connection the caller handed over."""
    from alembic import context

    cfg = context.config
    conn = cfg.attributes["connection"]
    context.configure(connection=conn, version_table=cfg.attributes["version_table"], render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
