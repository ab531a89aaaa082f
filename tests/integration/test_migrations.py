"""The migrations build exactly the schema the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from issuance.shared.db import checkout_models, office_models  # noqa: F401 - their tables share the metadata
from issuance.shared.db.models import Base
from sqlalchemy import create_engine

# Tables in the same database that are not the pipeline's: the transactional
# outbox belongs to the order system (other tests install it here).
FOREIGN_TABLES = {"issuance_outbox"}


def _ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    table = getattr(obj, "table", obj)
    return getattr(table, "name", name) not in FOREIGN_TABLES


def test_migrated_schema_matches_the_models(settings):
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _ours})
        drift = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert drift == []
