"""Logging set-up: one line per record, with the device id on every line that concerns a device.

Code that logs about a device passes it as a field, so operators can grep for it and log
shippers can index it::

    log.warning("registration rejected: %s", reason, extra={"device_id": uuid})

or uses :func:`device_logger` to bind it once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s [device=%(device_id)s] %(message)s"


class _DeviceIdDefault(logging.Filter):
    """Give records without a device id the placeholder ``-`` so the format always applies."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "device_id"):
            record.device_id = "-"
        return True


class DeviceLoggerAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def device_logger(logger: logging.Logger, device_id: str) -> DeviceLoggerAdapter:
    """Return ``logger`` with ``device_id`` put on every record it emits."""
    return DeviceLoggerAdapter(logger, {"device_id": device_id})


def configure_logging(level: str = "INFO") -> None:
    """Send every record to stderr in :data:`FORMAT`; safe to call more than once."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_edgetrust", False):
            root.removeHandler(handler)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_DeviceIdDefault())
    handler._edgetrust = True  # type: ignore[attr-defined] # marks our handler for reconfiguration
    root.addHandler(handler)
    root.setLevel(numeric)
