"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real captured attestation data lives beside the repository, never inside it.
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES}; check out shared/ beside the repository")
    return FIXTURES


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):
    """URL of an empty database, once on SQLite and once on PostgreSQL. The PostgreSQL run is
    skipped only when $EDGETRUST_TEST_POSTGRES_URL is unset (scripts/test.sh always sets it)."""
    from tests.support.database import POSTGRES_ENV, fresh_database, postgres_admin_url

    if request.param == "postgresql" and postgres_admin_url() is None:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def migrated_engine(database_url: str):
    """An engine on a fresh database upgraded to the newest revision."""
    from edgetrust.db import make_engine, upgrade

    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()
