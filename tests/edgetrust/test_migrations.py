"""The Alembic chain and the SQLAlchemy models describe the same schema.

Runs on SQLite and on PostgreSQL (``database_url``). A model change without a revision, or a
revision that does not match its model, fails ``test_head_matches_models``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from edgetrust.db import (
    SchemaError,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    import_all_models,
    make_engine,
    upgrade,
)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def schema_differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, import_all_models()))


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_head_matches_models(engine: Engine) -> None:
    upgrade(engine)

    assert current_revision(engine) == head_revision()
    assert "registered_devices" in table_names(engine)
    assert schema_differences(engine) == []


def test_downgrade_to_base_and_upgrade_again(engine: Engine) -> None:
    upgrade(engine)

    command.downgrade(alembic_config(engine), "base")

    assert current_revision(engine) is None
    assert table_names(engine) == set()

    upgrade(engine)

    assert current_revision(engine) == head_revision()
    assert schema_differences(engine) == []


def test_check_schema_accepts_head(engine: Engine) -> None:
    upgrade(engine)

    check_schema(engine)


def test_check_schema_rejects_older_revision(engine: Engine) -> None:
    upgrade(engine)
    command.downgrade(alembic_config(engine), "-1")

    with pytest.raises(SchemaError, match="edgetrust db upgrade") as raised:
        check_schema(engine)

    assert raised.value.code == "database-not-migrated"


def test_check_schema_rejects_empty_database(engine: Engine) -> None:
    with pytest.raises(SchemaError, match="edgetrust db upgrade"):
        check_schema(engine)
