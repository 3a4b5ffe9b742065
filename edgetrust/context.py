"""Services of the running server that request handlers use: settings, database sessions and
the long-lived objects built at start-up (trust stores, caches). The app factory builds them once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.settings import Settings


@dataclass
class AppServices:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    # Long-lived objects other packages attach at start-up, keyed by the package's name.
    extras: dict[str, Any] = field(default_factory=dict)


def services() -> AppServices:
    """Return the services of the Flask app handling the current request."""
    found = current_app.extensions.get("edgetrust")
    if not isinstance(found, AppServices):
        raise RuntimeError("the Flask app was not built by edgetrust.app.create_app")
    return found
