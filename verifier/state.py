"""The verifier's record of a device between two attestations.

The engine reads a ``DeviceState`` and returns the next one; the poller stores it as JSON in
the device's row after every attestation, so a restarted verifier continues where it stopped.

- ``ak_name``: name of the AK that signed the accepted quotes. The verifier pins it: a
  registrar entry with another AK means the device was enrolled again, and the verifier does
  not carry trust over to the new AK until an operator adds the device again.
- ``counters``: clockInfo of the last accepted quote, so that a replayed or rewound quote fails.
- ``boot``: the current boot session: its resetCount, when the verifier first saw it, and the
  boot_aggregate once verified.
- ``ima``: next IMA entry index, PCR 10 per bank after the entries verified so far, and the
  progress counters (``evidence.ima.ImaReplayState``).
- ``keyrings``: keys learned from ``ima-buf`` entries of this boot
  (``policies.runtime.KeyringState``).
- ``bank``: the PCR bank the device quoted last; a device that switches banks mid-session has
  its IMA list replayed from entry 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from evidence.errors import ParseError
from evidence.ima import ImaReplayState
from evidence.tpm import ClockInfo
from policies.errors import PolicyError
from policies.runtime import EMPTY_KEYRING_STATE, KeyringState
from verifier.errors import VerifierError

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class BootSession:
    """One boot of the device, as seen through its quotes."""

    reset_count: int
    started_at: datetime
    """Time of the first attestation that saw this resetCount."""
    boot_aggregate: str | None = None
    """``algorithm:hex`` of the verified boot_aggregate entry, once the list from entry 0 passed."""

    def to_json(self) -> dict[str, Any]:
        return {"reset_count": self.reset_count, "started_at": self.started_at.isoformat(),
                "boot_aggregate": self.boot_aggregate}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BootSession:
        aggregate = data.get("boot_aggregate")
        if aggregate is not None and not isinstance(aggregate, str):
            raise TypeError("boot_aggregate must be a string or null")
        started_at = datetime.fromisoformat(data["started_at"])
        if started_at.tzinfo is None:
            raise ValueError("started_at has no time zone")
        return cls(_count(data["reset_count"]), started_at, aggregate)


@dataclass(frozen=True)
class DeviceState:
    """The verifier's memory of one device; see the module docstring for each field."""

    ak_name: bytes
    counters: ClockInfo | None = None
    boot: BootSession | None = None
    ima: ImaReplayState = field(default_factory=ImaReplayState)
    keyrings: KeyringState = EMPTY_KEYRING_STATE
    bank: str | None = None

    def new_boot_session(self, counters: ClockInfo, now: datetime) -> DeviceState:
        """Return the state at the start of a boot session: IMA and keyrings from scratch."""
        return replace(
            self,
            counters=counters,
            boot=BootSession(counters.reset_count, now),
            ima=ImaReplayState(),
            keyrings=EMPTY_KEYRING_STATE,
        )

    def to_json(self) -> dict[str, Any]:
        counters = self.counters
        return {
            "version": STATE_VERSION,
            "ak_name": self.ak_name.hex(),
            "counters": None if counters is None else {
                "clock": counters.clock,
                "reset_count": counters.reset_count,
                "restart_count": counters.restart_count,
                "safe": counters.safe,
            },
            "boot": None if self.boot is None else self.boot.to_json(),
            "ima": self.ima.to_json(),
            "keyrings": self.keyrings.to_json(),
            "bank": self.bank,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceState:
        """Rebuild a state that ``to_json`` wrote; raise VerifierError if it is malformed."""
        try:
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version is {data.get('version')!r}, expected {STATE_VERSION}")
            counters = data["counters"]
            boot = data["boot"]
            bank = data["bank"]
            if bank is not None and not isinstance(bank, str):
                raise TypeError("bank must be a string or null")
            return cls(
                ak_name=bytes.fromhex(data["ak_name"]),
                counters=None if counters is None else ClockInfo(
                    _count(counters["clock"]),
                    _count(counters["reset_count"]),
                    _count(counters["restart_count"]),
                    bool(counters["safe"]),
                ),
                boot=None if boot is None else BootSession.from_json(boot),
                ima=ImaReplayState.from_json(data["ima"]),
                keyrings=KeyringState.from_json(data["keyrings"]),
                bank=bank,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise VerifierError(
                f"stored device state is malformed: {type(error).__name__}: {error}",
                code="device-state-invalid",
            ) from None
        except (ParseError, PolicyError) as error:
            raise VerifierError(
                f"stored device state is malformed: {error.message}", code="device-state-invalid"
            ) from None


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value
