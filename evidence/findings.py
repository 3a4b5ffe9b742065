"""Structured results of verification.

Verification of a whole piece of evidence (a quote, an IMA measurement list, an event log)
returns findings instead of stopping at the first problem, so that an operator sees every
reason at once. A finding's ``code`` is a stable kebab-case string that tests assert and
metrics count.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Severity(enum.IntEnum):
    """How much a finding weighs; anything at ERROR or above makes evidence untrusted."""

    INFO = 10
    WARNING = 20
    ERROR = 30
    CRITICAL = 40


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    context: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.name.lower(),
            "message": self.message,
            "context": dict(self.context),
        }


def is_failure(findings: Iterable[Finding]) -> bool:
    """Tell whether any finding is severe enough to fail the evidence."""
    return any(f.severity >= Severity.ERROR for f in findings)
