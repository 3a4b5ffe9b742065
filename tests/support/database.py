"""Fresh, migrated databases for tests: a SQLite file, or a new PostgreSQL database on the
server named by $EDGETRUST_TEST_POSTGRES_URL (scripts/test.sh starts one on 127.0.0.1)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from edgetrust.db import make_engine

POSTGRES_ENV = "EDGETRUST_TEST_POSTGRES_URL"


def postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


@contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of an empty database of ``kind`` ("sqlite" or "postgresql"); a PostgreSQL
    database is dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'edgetrust-test.db'}"
        return

    admin_url = postgres_admin_url()
    if admin_url is None:
        raise RuntimeError(f"{POSTGRES_ENV} is not set")
    name = f"edgetrust_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
