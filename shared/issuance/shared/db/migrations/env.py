"""Alembic environment: the URL comes from the caller's Config (see
issuance.shared.db.database.alembic_config), never from a file."""

from __future__ import annotations

from alembic import context
from issuance.shared.db import (
    checkout_models,  # noqa: F401 - registers the checkout's table
    office_models,  # noqa: F401 - registers the back office's tables
)
from issuance.shared.db.models import Base
from sqlalchemy import create_engine, pool

config = context.config


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
