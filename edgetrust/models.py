"""Imports every package's SQLAlchemy models, so that Base.metadata is complete.

Alembic's environment and the schema tests import this module; add each new models module here.
"""

from __future__ import annotations

from edgetrust.db import Base
from registrar import models as registrar_models  # noqa: F401 - registers its tables
from verifier import models as verifier_models  # noqa: F401 - registers its tables
from verifier import nodes as verifier_nodes  # noqa: F401 - registers its tables
from verifier import outbox_models as verifier_outbox_models  # noqa: F401 - registers its tables
from verifier import policy_models  # noqa: F401 - registers its tables
from verifier import tokens as verifier_tokens  # noqa: F401 - registers its tables

__all__ = ["Base"]
