"""Provision swtpm state directories with EK certificates for tests.

The implementation lives in :mod:`device.emulator`, which the demo uses too; this module keeps
the names tests import.
"""

from __future__ import annotations

from device.emulator import (
    REQUIRED_TOOLS,
    SWTPM_SETUP_TIMEOUT_SECONDS,
    LocalCa,
    ProvisionedTpm,
    missing_tools,
    provision_tpm_state,
)

__all__ = [
    "REQUIRED_TOOLS",
    "SWTPM_SETUP_TIMEOUT_SECONDS",
    "LocalCa",
    "ProvisionedTpm",
    "missing_tools",
    "provision_tpm_state",
]
