"""Connections: a psycopg 3 pool for the hot path (set-based SQL in
issuance.shared.db.store), a SQLAlchemy engine for the back office, Alembic for the schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from issuance.shared.settings import Settings
from psycopg_pool import ConnectionPool
from sqlalchemy import Engine, create_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(settings: Settings) -> Config:
    # Alembic is imported only by the commands that migrate: workers and the
    # page never load it.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
    return config


def upgrade(settings: Settings, revision: str = "heads") -> None:
    """Bring the schema to ``revision`` (``issuance db upgrade``); "heads" applies
    every branch of migrations."""
    from alembic import command

    command.upgrade(alembic_config(settings), revision)


def connect_options(settings: Settings) -> dict[str, Any]:
    """psycopg connection options. ``ISSUANCE_DB_PREPARED_STATEMENTS=false``
    (PgBouncer in transaction mode) turns automatic prepared statements off."""
    return {} if settings.db_prepared_statements else {"prepare_threshold": None}


def engine(settings: Settings) -> Engine:
    return create_engine(
        settings.sqlalchemy_url, pool_pre_ping=True, future=True, connect_args=connect_options(settings)
    )


def pool(settings: Settings, *, min_size: int = 1, max_size: int | None = None) -> ConnectionPool:
    """A pool that checks connections on checkout, so a restarted database
    costs one failed attempt, not a poisoned pool."""
    return ConnectionPool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size or settings.db_pool_size,
        check=ConnectionPool.check_connection,
        kwargs={"autocommit": False, **connect_options(settings)},
        open=True,
        name="issuance",
    )
