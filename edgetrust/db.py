"""Database engine, sessions, the declarative base and the schema revision check.

Every table of every package derives from :class:`Base`. The schema is owned by the Alembic
revisions in ``migrations/``; the server only starts on a database at the newest revision.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

import migrations

log = logging.getLogger(__name__)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SchemaError(Exception):
    """The database schema is not at the revision this release needs."""

    code = "database-not-migrated"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets foreign keys, WAL and a busy timeout so that the server's
    threads and a CLI can share the file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session whose work is committed on success and rolled back on any exception."""
    with factory() as session, session.begin():
        yield session


def alembic_config(engine: Engine | None = None) -> Config:
    directory = Path(next(iter(migrations.__path__)))
    config = Config()
    config.set_main_option("script_location", str(directory))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise SchemaError(f"migrations have {len(heads)} heads ({heads}); expected one chain")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    import_all_models()
    command.upgrade(alembic_config(engine), revision)


def check_schema(engine: Engine) -> None:
    """Raise SchemaError unless the database is at the newest revision."""
    expected = head_revision()
    found = current_revision(engine)
    if found == expected:
        return

    url = engine.url.render_as_string(hide_password=True)
    if found is None:
        state = "has no edgetrust schema"
    elif found in _known_revisions():
        state = f"is at revision {found}, older than this release's {expected}"
    else:
        state = f"is at revision {found}, which this release does not know (newer release?)"
    raise SchemaError(
        f"the database {url} {state}; run `edgetrust db upgrade` with the same settings first"
    )


def is_new_sqlite_database(engine: Engine) -> bool:
    """Tell whether ``engine`` is a SQLite database with no tables at all (a file just made)."""
    if engine.url.get_backend_name() != "sqlite":
        return False
    return not inspect(engine).get_table_names()


def _known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return {rev.revision for rev in script.walk_revisions()}


def import_all_models() -> MetaData:
    """Import every package's models so that ``Base.metadata`` lists all tables."""
    import edgetrust.models  # noqa: F401 - imported for its side effect of registering tables

    return Base.metadata
