"""Alembic environment and the one chain of schema revisions."""
