"""Verdict-change events for the trust API's server-sent-events stream, read from the database.

The poller adds a row to ``verifier_verdicts`` (``VerdictRecord``) whenever a device's verdict
status or reason codes change; the row's autoincrement ``id`` is the verdict-change sequence.
Every stream reads that table, so any number of server replicas serve the same events, and a
client that reconnects with ``Last-Event-ID: <sequence>`` receives every change after it.

A stream sends three kinds of ``verdict`` event, distinguished by the ``cause`` field:

- ``current``: on connect without ``Last-Event-ID``, the current verdict of each requested
  device, all with the newest sequence;
- ``attestation``: a verdict-change row, with its own sequence as the event id;
- ``expiry``: a trusted verdict whose ``expires_at`` passed without a newer attestation (no
  writer changes a row then, so each stream finds it by reading the device rows), or a
  device removed from the verifier. It carries the sequence of the last change sent, so a
  client that resumes from it may receive it again.

Events carry whole verdicts, so a repeated event is harmless. ``expires_at`` in an
``attestation`` event is that of the attestation that changed the status; later passing
attestations extend it without a change row. The stream, not the client, decides expiry.

On PostgreSQL, two pollers can commit change rows out of sequence order, so a reader may see
sequence 11 before 10 exists. :class:`ChangeFeed` stops at such a gap and waits up to
``GAP_WAIT_SECONDS`` for it to fill before it passes it, so that event ids stay in order and
a resumed stream misses nothing. Gaps left by rows deleted with their device are passed at
once when the row after them is older than ``GAP_HISTORY_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from verifier.api import verdict_json
from verifier.models import VerdictRecord, VerifierDevice
from verifier.nodes import NODE_NOT_MAPPED, nodes_named
from verifier.poller import as_utc
from verifier.verdicts import VerdictStatus

log = logging.getLogger(__name__)

DEVICE_NOT_FOUND: Final = "device-not-found"
# How long a reader waits for a missing sequence number to be committed.
GAP_WAIT_SECONDS: Final = 5.0
# A gap before a row issued longer ago than this is a deleted row, not an open transaction.
GAP_HISTORY_SECONDS: Final = 60.0
# Change rows one read fetches at most.
READ_BATCH: Final = 500


# --- what a client asked about ----------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """The devices a client asked about: by device id, by node name, or all (both None)."""

    device_ids: tuple[str, ...] | None = None
    nodes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ResolvedTargets:
    """Targets with node names mapped to device ids; ``device_ids`` None means every device."""

    device_ids: frozenset[str] | None
    # For targets given by node: each node and its device id, None for a node without one.
    node_devices: Mapping[str, str | None]

    def wants(self, device_id: str) -> bool:
        return self.device_ids is None or device_id in self.device_ids

    def node_of(self, device_id: str) -> str | None:
        for node, mapped in self.node_devices.items():
            if mapped == device_id:
                return node
        return None


def resolve(session: Session, targets: Targets) -> ResolvedTargets:
    """Map the node names of ``targets`` to device ids through the node mapping."""
    if targets.nodes is None:
        ids = None if targets.device_ids is None else frozenset(targets.device_ids)
        return ResolvedTargets(ids, {})
    mapped = nodes_named(session, targets.nodes)
    node_devices = {name: (mapped[name].device_id if name in mapped else None) for name in targets.nodes}
    return ResolvedTargets(frozenset(d for d in node_devices.values() if d is not None), node_devices)


def missing_verdict_json(device_id: str | None, code: str, message: str) -> dict[str, Any]:
    """Return an unknown verdict, in ``verdict_json`` form, for a device or node not found."""
    return {"verdict_id": None, "device_id": device_id, "status": VerdictStatus.UNKNOWN.value,
            "reasons": [{"code": code, "message": message}], "issued_at": None,
            "attested_at": None, "expires_at": None, "policies": []}


def _device_missing(device_id: str) -> dict[str, Any]:
    return missing_verdict_json(device_id, DEVICE_NOT_FOUND,
                                f"device {device_id!r} is not in the verifier")


def current_verdicts(session: Session, targets: Targets, at: datetime) -> list[dict[str, Any]]:
    """Return the verdict at ``at`` of each target, in request order.

    A device the verifier does not attest reads as unknown with reason ``device-not-found``,
    and a node without a device as unknown with reason ``node-not-mapped``. Verdicts of
    targets named by node carry a ``node`` field.
    """
    resolved = resolve(session, targets)
    query = select(VerifierDevice)
    if resolved.device_ids is not None:
        query = query.where(VerifierDevice.device_id.in_(sorted(resolved.device_ids)))
    rows = {row.device_id: row for row in session.scalars(query.order_by(VerifierDevice.device_id))}

    if targets.nodes is not None:
        return [_node_verdict(node, device_id, rows, at) for node, device_id in resolved.node_devices.items()]
    order = targets.device_ids if targets.device_ids is not None else tuple(rows)
    return [verdict_json(rows[d], at) if d in rows else _device_missing(d) for d in order]


def _node_verdict(node: str, device_id: str | None, rows: Mapping[str, VerifierDevice],
                  at: datetime) -> dict[str, Any]:
    if device_id is None:
        verdict = missing_verdict_json(None, NODE_NOT_MAPPED, f"node {node!r} is not mapped to a device")
    elif device_id in rows:
        verdict = verdict_json(rows[device_id], at)
    else:
        verdict = _device_missing(device_id)
    return {**verdict, "node": node}


def record_json(record: VerdictRecord) -> dict[str, Any]:
    """Return a verdict-change row as issued, in ``verdict_json`` form."""
    return {
        "verdict_id": record.verdict_id,
        "device_id": record.device_id,
        "status": record.status,
        "reasons": record.reasons,
        "issued_at": _iso(record.issued_at),
        "attested_at": _iso(record.attested_at),
        "expires_at": _iso(record.expires_at),
        "policies": record.policies,
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


# --- the change feed --------------------------------------------------------------------------


def latest_sequence(session: Session) -> int:
    return session.scalar(select(func.max(VerdictRecord.id))) or 0


class ChangeFeed:
    """Read verdict-change rows after a sequence number, in order, waiting briefly at gaps."""

    def __init__(self, after: int, *, clock: Callable[[], datetime],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cursor = after
        self._clock = clock
        self._monotonic = monotonic
        # First sequence number of the gap being waited for, and since when.
        self._gap: tuple[int, float] | None = None

    def read(self, session: Session) -> list[VerdictRecord]:
        """Return the rows after the cursor that can be delivered in order, and move past them."""
        rows = session.scalars(
            select(VerdictRecord).where(VerdictRecord.id > self.cursor)
            .order_by(VerdictRecord.id).limit(READ_BATCH)
        ).all()
        delivered = []
        for row in rows:
            if row.id != self.cursor + 1 and self._wait_at_gap(row):
                break
            delivered.append(row)
            self.cursor = row.id
            self._gap = None
        return delivered

    def _wait_at_gap(self, row_after: VerdictRecord) -> bool:
        """Tell whether to wait for the sequence numbers missing before ``row_after``."""
        if as_utc(row_after.issued_at) < self._clock() - timedelta(seconds=GAP_HISTORY_SECONDS):
            return False
        start = self.cursor + 1
        now = self._monotonic()
        if self._gap is None or self._gap[0] != start:
            self._gap = (start, now)
        if now - self._gap[1] < GAP_WAIT_SECONDS:
            return True
        log.info("verdict-change sequence numbers %d..%d never appeared; passing them",
                 start, row_after.id - 1)
        return False


def latest_statuses(session: Session, after: int) -> dict[str, str]:
    """Return each device's status in its newest change row with a sequence of at most ``after``."""
    newest = (select(func.max(VerdictRecord.id)).where(VerdictRecord.id <= after)
              .group_by(VerdictRecord.device_id))
    rows = session.execute(select(VerdictRecord.device_id, VerdictRecord.status)
                           .where(VerdictRecord.id.in_(newest)))
    return {device_id: status for device_id, status in rows}


# --- the stream -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOptions:
    poll_interval: float = 1.0
    heartbeat: float = 15.0
    max_seconds: float = 300.0


def encode_event(sequence: int, data: Mapping[str, Any]) -> str:
    """Return one server-sent event named ``verdict`` with ``sequence`` as its id."""
    return f"id: {sequence}\nevent: verdict\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


HEARTBEAT: Final = ": heartbeat\n\n"
# Reconnection delay a client should use, in milliseconds (the SSE retry field).
RETRY_MILLISECONDS: Final = 2000


class VerdictStream:
    """The events of one stream connection; iterate :meth:`events` to serve them."""

    def __init__(self, sessions: sessionmaker[Session], targets: Targets, *, last_event_id: int | None,
                 options: StreamOptions, clock: Callable[[], datetime],
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._sessions = sessions
        self._targets = targets
        self._last_event_id = last_event_id
        self._options = options
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        # The status last sent (or, on resume, last known to the client) of each device.
        self._sent: dict[str, str] = {}
        self._feed = ChangeFeed(0, clock=clock, monotonic=monotonic)
        self._resolved = ResolvedTargets(None, {})

    def events(self) -> Iterator[str]:
        """Yield the encoded events until ``max_seconds`` have passed."""
        deadline = self._monotonic() + self._options.max_seconds
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        yield from self._start()
        last_write = self._monotonic()

        while self._monotonic() < deadline:
            self._sleep(self._options.poll_interval)
            try:
                with self._sessions() as session:
                    chunk = [*self._changes(session), *self._expiries(session)]
            except SQLAlchemyError as error:
                # The client reconnects with Last-Event-ID and misses nothing.
                log.warning("ending a verdict stream: the database failed: %s", error.__class__.__name__)
                return
            if chunk:
                yield "".join(chunk)
                last_write = self._monotonic()
            elif self._monotonic() - last_write >= self._options.heartbeat:
                yield HEARTBEAT
                last_write = self._monotonic()

    def _start(self) -> Iterator[str]:
        with self._sessions() as session:
            self._resolved = resolve(session, self._targets)
            latest = latest_sequence(session)
            resume = self._last_event_id is not None and self._last_event_id <= latest
            if resume:
                assert self._last_event_id is not None
                self._feed.cursor = self._last_event_id
                known = latest_statuses(session, self._last_event_id)
                self._sent = {d: s for d, s in known.items() if self._resolved.wants(d)}
                return iter(())
            self._feed.cursor = latest
            verdicts = current_verdicts(session, self._targets, self._clock())
        for verdict in verdicts:
            if verdict["device_id"] is not None:
                self._sent[verdict["device_id"]] = verdict["status"]
        return iter([encode_event(latest, {**verdict, "cause": "current"}) for verdict in verdicts])

    def _changes(self, session: Session) -> Iterable[str]:
        for record in self._feed.read(session):
            if not self._resolved.wants(record.device_id):
                continue
            self._sent[record.device_id] = record.status
            yield encode_event(record.id, self._decorate(record_json(record), "attestation"))

    def _expiries(self, session: Session) -> Iterable[str]:
        """Yield an event for each device sent as trusted whose current verdict is not."""
        trusted = sorted(d for d, status in self._sent.items() if status == VerdictStatus.TRUSTED.value)
        if not trusted:
            return
        at = self._clock()
        rows = {row.device_id: row for row in session.scalars(
            select(VerifierDevice).where(VerifierDevice.device_id.in_(trusted)))}
        for device_id in trusted:
            row = rows.get(device_id)
            verdict = verdict_json(row, at) if row is not None else _device_missing(device_id)
            if verdict["status"] == VerdictStatus.TRUSTED.value:
                continue
            self._sent[device_id] = verdict["status"]
            yield encode_event(self._feed.cursor, self._decorate(verdict, "expiry"))

    def _decorate(self, verdict: dict[str, Any], cause: str) -> dict[str, Any]:
        node = self._resolved.node_of(verdict["device_id"])
        if node is not None:
            verdict["node"] = node
        verdict["cause"] = cause
        return verdict
