"""Alembic migrations, run programmatically (`payments db upgrade`), never by a worker starting."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


async def upgrade_async(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url)


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )


class SchemaNotReady(RuntimeError):
    pass


async def require_schema_at_head(engine: AsyncEngine) -> None:
    """Workers refuse to start on a database that `payments db upgrade` has not migrated."""
    expected = head_revision(str(engine.url))
    actual = await current_revision(engine)
    if actual != expected:
        raise SchemaNotReady(
            f"database schema is at {actual!r}, expected {expected!r}: run `payments db upgrade`"
        )
