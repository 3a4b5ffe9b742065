"""Alembic environment: runs revisions on the engine the caller put in the config, or on the
URL from the edgetrust settings."""

from __future__ import annotations

from alembic import context

from edgetrust.db import import_all_models, make_engine
from edgetrust.settings import load_settings

target_metadata = import_all_models()


def run_migrations() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        engine = make_engine(load_settings().effective_database_url)

    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
