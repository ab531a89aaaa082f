"""The migrations build exactly the schema the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from issuance.shared.db import office_models  # noqa: F401 - the back office's tables share the metadata
from issuance.shared.db.models import Base
from sqlalchemy import create_engine


def test_migrated_schema_matches_the_models(settings):
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        drift = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert drift == []
