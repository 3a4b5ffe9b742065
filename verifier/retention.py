"""Retention: delete old attestation rows and finished webhook deliveries in bounded batches.

A prune pass deletes attestations that finished before ``now - attestation_retention``, and
webhook deliveries that were delivered or failed before ``now - outbox_retention``. A
retention of zero keeps every row of that table. Whatever its age, a pass keeps:

- each device's latest attestation (greatest ``finished_at``);
- the attestation that issued the device's current verdict, which is the latest one unless
  the pollers' clocks disagree;
- the attestation that last changed the device's verdict (the one its newest verdict row
  refers to), so the findings that made a device untrusted stay readable while it stays so;
- every pending webhook delivery;
- the deliveries of the expiry event of a device's current verdict, because the delivery
  worker queues that event again when no delivery with its event id exists.

Later attestations read nothing from attestation rows, because what the engine carries from
one attestation to the next (clockInfo counters, boot session, IMA replay position and PCR 10
values, keyrings) is stored in ``verifier_devices.state``. Verdict rows are never deleted,
because the verdict stream uses their ids as its event sequence. When an attestation is
deleted, the verdict rows that refer to it keep their reasons, and their ``attestation_id``
becomes NULL.

Each batch of at most ``batch_size`` rows is its own transaction, so a pass holds row locks
only for one batch and other writers get in between batches. On PostgreSQL a pass takes a
session-level advisory lock, so only one of several pollers prunes at a time and the others
skip their pass. SQLite has no advisory locks but allows one writer at a time. Two passes that
run at the same time, such as ``edgetrust db prune`` on SQLite beside a poller, are safe
because each batch selects its rows again and a device's newest rows never qualify.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    delete,
    exists,
    func,
    select,
    text,
)

from edgetrust.settings import Settings, SettingsError
from verifier.models import Attestation, VerdictRecord, VerifierDevice
from verifier.outbox_models import WebhookDelivery

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock held during a pass: the first 8 bytes of
# SHA-256("edgetrust retention") as a signed 64-bit integer. A hash makes a clash with the
# small keys that other software on the same database may use unlikely.
LOCK_KEY: Final = int.from_bytes(hashlib.sha256(b"edgetrust retention").digest()[:8], "big",
                                 signed=True)
# Pause between two batches, so that writers waiting for SQLite's write lock get it.
BATCH_PAUSE_SECONDS: Final = 0.05
# Delivery statuses that no worker changes again.
FINISHED_DELIVERY_STATUSES: Final = ("delivered", "failed")

_ATTESTATIONS: Final[Table] = Attestation.__table__  # type: ignore[assignment] # a Table, not a FromClause
_DEVICES: Final[Table] = VerifierDevice.__table__  # type: ignore[assignment] # as above
_VERDICTS: Final[Table] = VerdictRecord.__table__  # type: ignore[assignment] # as above
_DELIVERIES: Final[Table] = WebhookDelivery.__table__  # type: ignore[assignment] # as above


@dataclass(frozen=True)
class RetentionOptions:
    """Retention settings of a prune pass, checked when the options are built."""

    attestation_retention: timedelta = timedelta(days=7)
    """Age after which attestations are deleted, where zero keeps them all."""
    outbox_retention: timedelta = timedelta(days=3)
    """Age after the last attempt at which finished deliveries are deleted, where zero keeps them all."""
    batch_size: int = 5000
    """Maximum number of rows that one transaction deletes."""
    interval: float = 600.0
    """Seconds between two passes of a poller, where zero means the poller does not prune."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SettingsError(
                f"setting retention_batch_size is {self.batch_size}, expected an integer of at "
                "least 1, such as the default 5000")
        # threading.Event.wait raises OverflowError for a timeout above TIMEOUT_MAX.
        if not 0 <= self.interval <= threading.TIMEOUT_MAX:
            raise SettingsError(
                f"setting retention_interval is {self.interval}, expected seconds of at least 0 "
                f"and at most {threading.TIMEOUT_MAX:.0f}; 0 turns pruning in the pollers off")
        for name, retention in (("attestation_retention", self.attestation_retention),
                                ("outbox_retention", self.outbox_retention)):
            if retention < timedelta(0):
                raise SettingsError(f"setting {name} is {retention}, expected a duration of at "
                                    "least 0; 0 keeps every row")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionOptions:
        """Build the options from ``settings``. Raise SettingsError naming an invalid setting."""
        return cls(
            attestation_retention=settings.attestation_retention,
            outbox_retention=settings.outbox_retention,
            batch_size=settings.retention_batch_size,
            interval=settings.retention_interval,
        )


@dataclass(frozen=True)
class PruneResult:
    """Counts of the rows one pass deleted or, with ``dry_run``, would delete."""

    attestations: int = 0
    webhook_deliveries: int = 0
    attestation_cutoff: datetime | None = None
    """Time before which finished attestations are deleted, or None when the retention is zero."""
    outbox_cutoff: datetime | None = None
    """Time before which finished deliveries are deleted, or None when the retention is zero."""
    batches: int = 0
    dry_run: bool = False
    locked_out: bool = False
    """Flag set when another session held the advisory lock, so this pass deleted nothing."""
    stopped: bool = False
    """Flag set when the stop event ended the pass early, so older rows may remain."""


def prune(engine: Engine, options: RetentionOptions, *, now: datetime, dry_run: bool = False,
          stop: threading.Event | None = None) -> PruneResult:
    """Delete rows older than the retention settings in batches, except those the module docstring keeps.

    With ``dry_run`` count them instead and delete nothing. ``stop`` ends the pass after the
    batch in progress. Database errors propagate.
    """
    attestation_cutoff = _cutoff(now, options.attestation_retention)
    outbox_cutoff = _cutoff(now, options.outbox_retention)
    result = PruneResult(attestation_cutoff=attestation_cutoff, outbox_cutoff=outbox_cutoff,
                         dry_run=dry_run)
    attestations = _ATTESTATIONS.alias("candidate")
    deliveries = _DELIVERIES.alias("candidate")

    with engine.connect() as connection:
        if dry_run:
            return _count(connection, result, attestations, deliveries)

        if not _try_lock(connection):
            return PruneResult(attestation_cutoff=attestation_cutoff, outbox_cutoff=outbox_cutoff,
                               locked_out=True)
        try:
            deleted = _Batches(connection, options.batch_size, stop)
            if attestation_cutoff is not None:
                result = replace(result, attestations=deleted.run(
                    _ATTESTATIONS, attestations, _prunable_attestations(attestations, attestation_cutoff),
                    order_by=(attestations.c.finished_at, attestations.c.id)))
            if outbox_cutoff is not None and not deleted.stopped:
                result = replace(result, webhook_deliveries=deleted.run(
                    _DELIVERIES, deliveries, _prunable_deliveries(deliveries, outbox_cutoff),
                    order_by=(deliveries.c.id,)))
        finally:
            _unlock(connection)
    return replace(result, batches=deleted.batches, stopped=deleted.stopped)


def _cutoff(now: datetime, retention: timedelta) -> datetime | None:
    """Return ``now - retention``, or None for a retention of zero, which keeps every row."""
    if retention <= timedelta(0):
        return None

    now = now.astimezone(UTC)
    earliest = datetime.min.replace(tzinfo=UTC)
    # A retention such as 1000000w reaches before year 1, where the subtraction would overflow.
    if retention >= now - earliest:
        return earliest
    return now - retention


# --- What may go ---------------------------------------------------------------------------------


def _prunable_attestations(candidate: Any, cutoff: datetime) -> list[ColumnElement[bool]]:
    """Return the conditions under which the attestation ``candidate`` may be deleted."""
    newer = _ATTESTATIONS.alias("newer")
    record = _VERDICTS.alias("record")
    later_record = _VERDICTS.alias("later_record")
    return [
        candidate.c.finished_at < cutoff,
        # It is not the device's latest attestation.
        exists().where(newer.c.device_id == candidate.c.device_id,
                       newer.c.finished_at > candidate.c.finished_at),
        # It did not issue the device's current verdict.
        ~exists().where(_DEVICES.c.device_id == candidate.c.device_id,
                        _DEVICES.c.verdict_id == candidate.c.verdict_id),
        # It is not the attestation of the device's newest verdict row.
        ~exists().where(record.c.attestation_id == candidate.c.id,
                        ~exists().where(later_record.c.device_id == record.c.device_id,
                                        later_record.c.id > record.c.id)),
    ]


def _prunable_deliveries(candidate: Any, cutoff: datetime) -> list[ColumnElement[bool]]:
    """Return the conditions under which the webhook delivery ``candidate`` may be deleted."""
    return [
        candidate.c.status.in_(FINISHED_DELIVERY_STATUSES),
        # The delivery worker sets next_attempt_at to the time of the last attempt when it
        # marks a delivery delivered or failed.
        candidate.c.next_attempt_at < cutoff,
        # verifier.notify.enqueue_expired_verdicts queues "<verdict id>:expiry" for a device's
        # expired trusted verdict unless a delivery with that event id exists.
        ~exists().where(_DEVICES.c.device_id == candidate.c.device_id,
                        _DEVICES.c.verdict_id.concat(":expiry") == candidate.c.event_id),
    ]


# --- Deleting ------------------------------------------------------------------------------------


class _Batches:
    """Delete rows in transactions of at most ``batch_size`` rows, counting the batches."""

    def __init__(self, connection: Connection, batch_size: int, stop: threading.Event | None) -> None:
        self._connection = connection
        self._batch_size = batch_size
        self._stop = stop
        self.batches = 0
        self.stopped = False

    def run(self, table: Table, candidate: Any, conditions: Sequence[ColumnElement[bool]], *,
            order_by: Sequence[Any]) -> int:
        """Delete the rows of ``table`` that meet ``conditions`` on its alias ``candidate``."""
        # Delete the oldest rows first, so that a stopped pass has removed those.
        chosen = select(candidate.c.id).where(*conditions).order_by(*order_by).limit(self._batch_size)
        statement = delete(table).where(table.c.id.in_(chosen))
        deleted = 0
        while True:
            with self._connection.begin():
                count = self._connection.execute(statement).rowcount
            if count == 0:
                return deleted
            deleted += count
            self.batches += 1
            if count < self._batch_size:
                return deleted
            if self._paused_until_stop():
                self.stopped = True
                return deleted

    def _paused_until_stop(self) -> bool:
        if self._stop is None:
            time.sleep(BATCH_PAUSE_SECONDS)
            return False
        return self._stop.wait(BATCH_PAUSE_SECONDS)


def _count(connection: Connection, result: PruneResult, attestations: Any, deliveries: Any) -> PruneResult:
    if result.attestation_cutoff is not None:
        result = replace(result, attestations=connection.scalar(
            select(func.count()).select_from(attestations)
            .where(*_prunable_attestations(attestations, result.attestation_cutoff))) or 0)
    if result.outbox_cutoff is not None:
        result = replace(result, webhook_deliveries=connection.scalar(
            select(func.count()).select_from(deliveries)
            .where(*_prunable_deliveries(deliveries, result.outbox_cutoff))) or 0)
    return result


def _try_lock(connection: Connection) -> bool:
    """Try to acquire the advisory lock on PostgreSQL, and return False if another session holds it."""
    if connection.dialect.name != "postgresql":
        return True
    with connection.begin():
        # A session-level lock outlives this transaction and lasts until it is unlocked or the
        # session ends.
        return bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}))


def _unlock(connection: Connection) -> None:
    if connection.dialect.name != "postgresql":
        return
    try:
        if connection.in_transaction():
            connection.rollback()
        with connection.begin():
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
    except Exception:
        # Closing the connection releases the lock, so the pool must not hand it out again.
        connection.invalidate()
        raise


# --- The poller's pass ---------------------------------------------------------------------------


class Pruner:
    """Run a prune pass every ``options.interval`` seconds in a thread beside a poller."""

    def __init__(self, engine: Engine, options: RetentionOptions, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if options.interval <= 0:
            raise ValueError(f"a pruner needs retention_interval above 0, got {options.interval}")
        self._engine = engine
        self.options = options
        self._clock = clock

    def start(self, stop: threading.Event) -> threading.Thread:
        """Start the pruning thread, which runs its first pass at once and ends when ``stop`` is set."""
        thread = threading.Thread(target=self.run, args=(stop,), name="retention", daemon=True)
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_pass(stop)
            stop.wait(self.options.interval)

    def run_pass(self, stop: threading.Event | None = None) -> PruneResult | None:
        """Prune once and log the outcome in one line. Return None if the pass failed."""
        started = time.monotonic()
        try:
            result = prune(self._engine, self.options, now=self._clock(), stop=stop)
        except Exception as exc:  # noqa: BLE001 - a database outage must not end the thread
            # Keep the first line, because SQLAlchemy appends the SQL statement on further lines.
            summary = str(exc).partition("\n")[0]
            log.exception("prune pass failed, retrying in %.0f s: %s: %s", self.options.interval,
                          type(exc).__name__, summary)
            return None

        if result.locked_out:
            log.debug("prune pass skipped: another session has acquired the advisory lock %d",
                      LOCK_KEY)
            return result

        ending = "; stopped before the end" if result.stopped else ""
        log.info("prune pass deleted %d attestations (%s) and %d webhook deliveries (%s) in %d "
                 "batches, %.1f s%s", result.attestations, _before(result.attestation_cutoff),
                 result.webhook_deliveries, _before(result.outbox_cutoff), result.batches,
                 time.monotonic() - started, ending)
        return result


def _before(cutoff: datetime | None) -> str:
    if cutoff is None:
        return "retention 0, all kept"
    return f"finished before {cutoff.isoformat()}"
