"""The UEFI event log the agent serves, and its replay into a TPM simulator.

A device with firmware measured boot has its log in securityfs
(``/sys/kernel/security/tpm0/binary_bios_measurements``); the agent serves that file as
``mb_measurement_list``. Without it, the agent serves the file in ``agent_event_log``.

With ``agent_event_log_replay`` set, the agent plays the firmware's part on a TPM simulator:
once after each TPM reset it extends PCR 0-9 and 14 with the digests the configured log
records, so that the log replays to the quoted PCRs. ``EV_NO_ACTION`` events extend nothing,
and events for other PCRs are skipped. ``replay_event_log_into_tpm`` decides from the PCR
values whether a reset happened: all of the log's PCRs zero means a fresh reset, and all of
them equal to the log's replay means the replay already ran.

PCR 0 limit: a log with a StartupLocality event (TPM2_Startup at locality 3, so PCR 0 starts
as 31 zero bytes and 0x03) or an H-CRTM event (PCR 0 starts at locality 4) cannot be
reproduced. TPM2_PCR_Extend can only hash into PCR 0, never set its starting value, and swtpm
started with ``--flags startup-clear`` runs TPM2_Startup at locality 0. Such logs are rejected
with an error; build a log without them (``tests/support/eventlog.py`` does by default).

Banks: each event is extended into the TPM banks that the log also carries. A bank the TPM
allocates but the log lacks (swtpm's SHA-384 and SHA-512) stays at zero, so only the log's
banks can be quoted against it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Final

from device.attest import AttestationTpm, bank_name
from device.errors import AgentSettingsError, DeviceError
from evidence.errors import ParseError
from evidence.eventlog import EventLog, parse_event_log, read_event_log, replay_event_log
from evidence.tpm import PcrBank, PcrSelection, TpmAlg

log = logging.getLogger(__name__)

SECURITYFS_EVENT_LOG: Final = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
# PCRs that only pre-OS code extends: firmware (0-7), boot loader (8-9) and shim's MOK lists
# (14), the PCRs a Keylime measured-boot policy checks.
REPLAY_PCRS: Final = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14})

_BANKS_BY_NAME: Final = {"sha1": TpmAlg.SHA1, "sha256": TpmAlg.SHA256, "sha384": TpmAlg.SHA384,
                         "sha512": TpmAlg.SHA512}


class EventLogReplayError(DeviceError):
    """The configured event log cannot be replayed into this TPM."""

    default_code = "event-log-replay-failed"


class ReplayOutcome(Enum):
    """Result of ``replay_event_log_into_tpm``."""

    REPLAYED = "replayed"
    ALREADY_REPLAYED = "already-replayed"


def event_log_path(configured: Path | None, *, securityfs: Path = SECURITYFS_EVENT_LOG) -> Path | None:
    """Return the event log to serve: securityfs when present, else ``configured``, else None.

    Raises AgentSettingsError when ``configured`` is set but is not a file.
    """
    if securityfs.exists():
        return securityfs
    if configured is None:
        return None
    if not configured.is_file():
        raise AgentSettingsError(
            f"setting agent_event_log is {str(configured)!r}, which is not a file; set it to a "
            "binary UEFI event log (the format of binary_bios_measurements)")
    return configured


def load_event_log(path: Path) -> bytes:
    """Read the whole event log; raise DeviceError when it cannot be read."""
    try:
        return read_event_log(path)
    except OSError as exc:
        raise DeviceError(f"cannot read the UEFI event log {path}: {exc.strerror or exc}",
                          code="event-log-unreadable") from exc


def replay_event_log_into_tpm(tpm: AttestationTpm, raw_log: bytes) -> ReplayOutcome:
    """Extend the TPM's PCRs with the log's digests once after a TPM reset (TPM2_GetCapability,
    TPM2_PCR_Read, TPM2_PCR_Extend).

    Steps:
    1. Parse the log and reject one whose PCR 0 starts at a locality other than 0.
    2. Pick the banks that both the TPM and the log have.
    3. Read the log's PCRs: equal to the replayed values means done already, all zeros means
       a fresh reset, anything else raises EventLogReplayError.
    4. Extend every event of PCR 0-9 and 14 (``EV_NO_ACTION`` excepted) in log order.
    5. Read the PCRs again; they must equal the replayed values.
    """
    # 1. Parse.
    event_log = _parse(raw_log)

    # 2. Banks in common.
    banks = _common_banks(tpm, event_log)

    with tpm.lock:
        # 3. Current values against the replayed ones.
        expected = _expected_values(event_log, banks)
        current = tpm.read_pcrs(_selection(expected))
        if current == expected:
            log.info("UEFI event log already replayed into PCRs %s", _pcr_list(expected))
            return ReplayOutcome.ALREADY_REPLAYED
        if not all(not any(value) for values in current.values() for value in values.values()):
            raise EventLogReplayError(
                f"PCRs {_pcr_list(expected)} are neither zero nor the values the event log "
                "replays to, so they were extended since the last TPM reset; restart the TPM "
                "(swtpm) before replaying the log")

        # 4. Extend.
        skipped = _extend_events(tpm, event_log, banks)

        # 5. Check.
        after = tpm.read_pcrs(_selection(expected))
    if after != expected:
        raise EventLogReplayError(
            f"after replaying the event log, PCRs {_pcr_list(expected)} differ from the log's "
            "replay; another program extended them at the same time")
    if skipped:
        log.warning("UEFI event log replay skipped %d events of PCRs outside %s", skipped,
                    sorted(REPLAY_PCRS))
    log.info("replayed the UEFI event log into PCRs %s of banks %s", _pcr_list(expected),
             ", ".join(bank_name(bank) for bank in banks))
    return ReplayOutcome.REPLAYED


def _parse(raw_log: bytes) -> EventLog:
    try:
        event_log = parse_event_log(raw_log)
    except ParseError as exc:
        raise EventLogReplayError(f"the UEFI event log does not parse: {exc.message}",
                                  code="event-log-invalid") from exc
    if event_log.h_crtm or event_log.startup_locality not in (None, 0):
        locality = 4 if event_log.h_crtm else event_log.startup_locality
        raise EventLogReplayError(
            f"the UEFI event log starts PCR 0 at locality {locality} (a StartupLocality or "
            "H-CRTM event), which TPM2_PCR_Extend cannot reproduce; use a log without it",
            code="event-log-locality-unsupported")
    return event_log


def _common_banks(tpm: AttestationTpm, event_log: EventLog) -> tuple[TpmAlg, ...]:
    allocated = tpm.allocated_banks()
    banks = tuple(_BANKS_BY_NAME[name] for name in event_log.bank_names
                  if name in _BANKS_BY_NAME and _BANKS_BY_NAME[name] in allocated)
    if not banks:
        raise EventLogReplayError(
            f"the UEFI event log carries banks {', '.join(event_log.bank_names)}, and the TPM "
            f"allocates {', '.join(bank_name(bank) for bank in allocated)}; none is in both",
            code="event-log-bank-unavailable")
    return banks


def _expected_values(event_log: EventLog, banks: tuple[TpmAlg, ...]) -> dict[TpmAlg, dict[int, bytes]]:
    replayed = replay_event_log(event_log)
    expected: dict[TpmAlg, dict[int, bytes]] = {}
    for bank in banks:
        values = replayed.get(bank_name(bank), {})
        expected[bank] = {pcr: value for pcr, value in values.items() if pcr in REPLAY_PCRS}
    if not any(expected.values()):
        raise EventLogReplayError(
            f"the UEFI event log extends none of PCRs {sorted(REPLAY_PCRS)}",
            code="event-log-invalid")
    return expected


def _selection(values: Mapping[TpmAlg, Mapping[int, bytes]]) -> PcrSelection:
    return PcrSelection(tuple(PcrBank(bank, tuple(sorted(pcrs))) for bank, pcrs in values.items()))


def _pcr_list(values: Mapping[TpmAlg, Mapping[int, bytes]]) -> str:
    pcrs = sorted({pcr for bank_values in values.values() for pcr in bank_values})
    return ",".join(map(str, pcrs))


def _extend_events(tpm: AttestationTpm, event_log: EventLog, banks: tuple[TpmAlg, ...]) -> int:
    """TPM2_PCR_Extend each event of the replayed PCRs; return how many events were skipped."""
    skipped = 0
    names = {bank_name(bank): bank for bank in banks}
    for event in event_log.events:
        if not event.extends_pcr:
            continue
        if event.pcr not in REPLAY_PCRS:
            skipped += 1
            continue
        digests = {names[name]: digest for name, digest in event.digests.items() if name in names}
        tpm.extend_pcr(event.pcr, digests)
    return skipped
