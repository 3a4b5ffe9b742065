"""The poller: claims devices that are due, requests a quote from each, verifies it, stores the result.

One cycle for one device:

1. Claim. A poller claims due devices in one short transaction: it moves their due time to
   the end of a lease and writes its name and a random claim id. On PostgreSQL the due rows
   are selected ``FOR UPDATE SKIP LOCKED``, so a poller skips rows that another is claiming
   instead of waiting for them. The claim is a conditional UPDATE that still requires the row
   to be due, which on SQLite (one writer at a time) keeps two pollers from claiming one
   device too. A poller that dies leaves its
   devices claimed until the lease expires; then they are due again.
2. Load, in the claim's transaction: the device with its state, its registrar row (AK, EK,
   mTLS certificate) and the latest version of each of its policies.
3. Request a quote over a fresh nonce of 20 letters and digits (single use, like Keylime's),
   for the PCRs its policies need and the IMA list from the next unverified entry.
4. Verify with ``engine.verify``. When the device rebooted and sent the list from the old
   offset, ask once more for the list from entry 0 within the same claim.
5. Store the attestation, the next state and the verdict in one transaction, on the
   condition that the claim is still this poller's. A device that could not be reached gets
   an unknown verdict and is retried after a delay that doubles with each failure, up to
   ``backoff_max`` seconds; its state is kept unchanged.

Everything a poller knows lives in the database, so a restarted poller continues with the
next IMA entry of each device. Concurrency is a thread pool of ``threads`` workers. A thread
beside the pool deletes old attestation and outbox rows (``verifier.retention``).

NOTE: leases compare the pollers' own clocks. Pollers on several hosts need synchronised
clocks (NTP); a poller whose clock runs ahead by more than the lease margin could claim a
device whose lease has not expired.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import string
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Engine, bindparam, exists, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from edgetrust.db import transaction
from edgetrust.settings import Settings, SettingsError
from evidence.errors import EvidenceError
from evidence.findings import Finding, Severity
from evidence.quote import load_ak_public
from evidence.tpm import PublicArea, ak_qualified_name, parse_tpm2b_public
from policies.errors import PolicyError
from policies.measured_boot import MeasuredBootPolicy
from policies.pcr import PcrPolicy
from policies.runtime import RuntimePolicy
from registrar.models import RegisteredDevice
from verifier import policy_store
from verifier.agent_client import AgentClient, AgentContact, ClientIdentity
from verifier.engine import (
    IMA_LIST_RESTART_NEEDED,
    Challenge,
    EngineOptions,
    Enrollment,
    Evidence,
    Loaded,
    PolicySet,
    PolicyT,
    VerificationResult,
    pcr_mask,
    requested_pcrs,
    verify,
)
from verifier.errors import AgentError, VerifierError
from verifier.models import Attestation, VerdictRecord, VerifierDevice
from verifier.outbox_models import PushDevice
from verifier.policy_models import Policy, PolicyVersion
from verifier.retention import Pruner, RetentionOptions
from verifier.state import DeviceState
from verifier.verdicts import AppliedPolicy, Verdict, VerdictStatus, unknown_verdict

log = logging.getLogger(__name__)

NONCE_LENGTH: Final = 20
_NONCE_ALPHABET: Final = string.ascii_letters + string.digits
# Finding code of an attestation that could not start because of the registrar row.
DEVICE_NOT_ACTIVE: Final = "device-not-active"
# Finding code of a device whose policies could not be loaded.
POLICY_UNAVAILABLE: Final = "policy-unavailable"


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_nonce() -> str:
    """Return a random nonce of 20 letters and digits (about 119 bits)."""
    return "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(NONCE_LENGTH))


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; SQLite returns stored times without a zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- Options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PollerOptions:
    poller_id: str
    threads: int = 8
    batch_size: int = 32
    lease_seconds: float = 60.0
    agent_timeout: float = 10.0
    backoff_max: float = 300.0
    idle_wait: float = 0.1
    """Maximum sleep, in seconds, between two queries for due devices."""
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        # Two requests per claim at most (one retry from entry 0), and a margin for the database.
        needed = 2 * self.agent_timeout + 5
        if self.lease_seconds < 2 * needed:
            raise SettingsError(
                f"setting verifier_lease_seconds is {self.lease_seconds}, expected at least "
                f"{2 * needed} (four agent timeouts plus 10 s), so that a lease outlasts an "
                "attestation that waits in the queue and then times out twice"
            )
        if self.threads < 1 or self.batch_size < 1:
            raise SettingsError(
                "settings verifier_poller_threads and verifier_claim_batch must be at least 1"
            )

    @property
    def max_attestation_seconds(self) -> float:
        return 2 * self.agent_timeout + 5

    @classmethod
    def from_settings(cls, settings: Settings) -> PollerOptions:
        return cls(
            poller_id=settings.verifier_poller_id or f"{socket.gethostname()}-{os.getpid()}",
            threads=settings.verifier_poller_threads,
            batch_size=settings.verifier_claim_batch,
            lease_seconds=settings.verifier_lease_seconds,
            agent_timeout=settings.verifier_agent_timeout,
            backoff_max=settings.verifier_backoff_max,
            engine=EngineOptions(
                accepted_banks=tuple(settings.verifier_accepted_banks),
                verdict_lifetime_intervals=settings.verifier_verdict_lifetime_intervals,
                allow_ima_violations=settings.verifier_allow_ima_violations,
                allow_zero_boot_aggregate=settings.verifier_allow_zero_boot_aggregate,
            ),
        )


def agent_client_from_settings(settings: Settings) -> AgentClient:
    """Build the agent client; raise SettingsError if mTLS is on without a client identity."""
    identity = None
    if settings.verifier_agent_mtls:
        if settings.verifier_tls_cert is None or settings.verifier_tls_key is None:
            raise SettingsError(
                "verifier_agent_mtls is true, but verifier_tls_cert and verifier_tls_key are not "
                "set; give the verifier's client certificate and key (PEM files), or set "
                "verifier_agent_mtls = false to reach agents over plain HTTP"
            )
        identity = ClientIdentity(settings.verifier_tls_cert, settings.verifier_tls_key)
    return AgentClient(mtls=settings.verifier_agent_mtls, identity=identity,
                       timeout=settings.verifier_agent_timeout,
                       api_version=settings.verifier_agent_api_version)


# --- Policies -------------------------------------------------------------------------------


class PolicyResolver:
    """Load devices' policies: the latest version of each name, compiled once per content."""

    def load_many(self, session: Session, devices: Sequence[Any]) -> dict[str, PolicySet | Finding]:
        """Return each device's policies, or a finding saying why they cannot be loaded.

        ``devices`` are rows or objects with ``device_id`` and the policy name columns of
        ``VerifierDevice``.
        """
        names = {name for device in devices for name in _policy_names(device) if name is not None}
        versions = self._latest_versions(session, names) if names else {}
        loaded: dict[str, PolicySet | Finding] = {}
        for device in devices:
            try:
                loaded[device.device_id] = PolicySet(
                    runtime=self._loaded(session, versions, device.runtime_policy, "runtime", RuntimePolicy),
                    measured_boot=self._loaded(session, versions, device.mb_policy, "measured-boot",
                                               MeasuredBootPolicy),
                    pcr=self._loaded(session, versions, device.pcr_policy, "pcr", PcrPolicy),
                )
            except (PolicyError, policy_store.PolicyStoreError, VerifierError) as error:
                log.error("policies of the device cannot be loaded (%s): %s", error.code, error,
                          extra={"device_id": device.device_id})
                loaded[device.device_id] = _warning(POLICY_UNAVAILABLE, f"policies cannot be loaded: {error}")
        return loaded

    def _latest_versions(self, session: Session, names: set[str]) -> dict[str, Any]:
        rows = session.connection().execute(_LATEST_VERSIONS, {"p_names": sorted(names)})
        return {version.name: version for version in rows}

    def _loaded(self, session: Session, versions: Mapping[str, Any], name: str | None, kind: str,
                compiled_type: type[PolicyT]) -> Loaded[PolicyT] | None:
        if name is None:
            return None
        version = versions.get(name)
        if version is None:
            raise VerifierError(f"policy {name!r} has no stored version", code="policy-not-found")
        compiled = policy_store.compiled(session, version.content_hash)
        if version.kind != kind or not isinstance(compiled, compiled_type):
            raise _kind_error(name, kind)
        return Loaded(AppliedPolicy(kind, name, version.version, version.content_hash), compiled)


# The latest version of each named policy.
_LATEST_VERSIONS: Final = (
    select(PolicyVersion.name, PolicyVersion.kind, PolicyVersion.version, PolicyVersion.content_hash)
    .join(Policy, (Policy.name == PolicyVersion.name) & (Policy.latest_version == PolicyVersion.version))
    .where(PolicyVersion.name.in_(bindparam("p_names", expanding=True)))
)


def _policy_names(device: Any) -> tuple[str | None, ...]:
    return device.runtime_policy, device.mb_policy, device.pcr_policy


def _kind_error(name: str, kind: str) -> VerifierError:
    return VerifierError(f"policy {name!r} is not a {kind} policy", code="policy-kind-mismatch")


# --- Claims and jobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A device claimed by this poller until ``lease_expires_at``, with what attesting it needs,
    loaded in the claim's transaction."""

    device_pk: int
    device_id: str
    lease_id: str
    scheduled_at: datetime
    lease_expires_at: datetime
    contact: AgentContact
    poll_interval: float
    consecutive_failures: int
    verdict_key: tuple[str, tuple[str, ...]]
    """Status and reason codes of the current verdict, to tell whether the next one changes them."""
    verdict_expires_at: datetime | None = None
    """Expiry of the current verdict, so that an expired trusted verdict counts as unknown."""
    enrollment: Enrollment | None = None
    policies: PolicySet = PolicySet()
    state: DeviceState | None = None
    blocked: Finding | None = None
    """Reason that no request can be made (registrar row not active, policies not loadable)."""


@dataclass(frozen=True)
class _Outcome:
    verdict: Verdict
    findings: tuple[Finding, ...]
    next_state: DeviceState | None
    reached: bool
    nonce: str | None
    ima_start_index: int | None
    evidence: dict[str, Any]


class _LeaseLost(Exception):
    pass


@functools.lru_cache(maxsize=4096)
def _qualified_name(ek_tpm: bytes, aik_tpm: bytes) -> bytes:
    return ak_qualified_name(parse_tpm2b_public(ek_tpm), load_ak_public(aik_tpm))


def enrollment_of(device_id: str, aik_tpm: bytes, ek_tpm: bytes | None) -> Enrollment:
    """Return the engine's view of a registrar row; raise EvidenceError if its AK is malformed."""
    ak: PublicArea = load_ak_public(aik_tpm)
    qualified_name = _qualified_name(ek_tpm, aik_tpm) if ek_tpm else None
    return Enrollment(device_id, ak, qualified_name)


# --- The poller -----------------------------------------------------------------------------

# Columns of a device and its registrar row that a claim reads.
_CLAIM_COLUMNS: Final = (
    VerifierDevice.id, VerifierDevice.device_id, VerifierDevice.ip, VerifierDevice.port,
    VerifierDevice.poll_interval, VerifierDevice.consecutive_failures, VerifierDevice.verdict_status,
    VerifierDevice.verdict_reasons, VerifierDevice.verdict_expires_at, VerifierDevice.state,
    VerifierDevice.next_poll_at,
    VerifierDevice.runtime_policy, VerifierDevice.mb_policy, VerifierDevice.pcr_policy,
    RegisteredDevice.active, RegisteredDevice.aik_tpm, RegisteredDevice.ek_tpm, RegisteredDevice.mtls_cert,
)

# Statements of the per-attestation path, built once: constructing them and their cache keys
# on every call cost more CPU than the rest of an attestation. Parameters start with p_.
_TABLES: Final = VerifierDevice.metadata.tables
_DEVICES: Final = _TABLES[VerifierDevice.__tablename__]
_ATTESTATIONS: Final = _TABLES[Attestation.__tablename__]
_DUE = (
    select(*_CLAIM_COLUMNS)
    .join(RegisteredDevice, RegisteredDevice.device_id == VerifierDevice.device_id)
    .where(
        VerifierDevice.paused.is_(False),
        VerifierDevice.next_poll_at <= bindparam("p_now"),
        # A push-mode device sends its own evidence; a resume must not make pollers pull it.
        ~exists().where(PushDevice.device_id == VerifierDevice.device_id),
    )
    .order_by(VerifierDevice.next_poll_at)
    .limit(bindparam("p_limit"))
)
_DUE_SKIP_LOCKED: Final = _DUE.with_for_update(skip_locked=True, of=VerifierDevice)
_LEASE: Final = (
    update(_DEVICES)
    .where(
        _DEVICES.c.id.in_(bindparam("p_ids", expanding=True)),
        _DEVICES.c.paused.is_(False),
        _DEVICES.c.next_poll_at <= bindparam("p_now"),
    )
    .values(lease_owner=bindparam("p_owner"), lease_id=bindparam("p_lease_id"),
            lease_expires_at=bindparam("p_lease_expires_at"), next_poll_at=bindparam("p_lease_expires_at"))
    .returning(_DEVICES.c.id)
)
_STORED_COLUMNS: Final = (
    "state", "verdict_id", "verdict_status", "verdict_reasons", "verdict_policies", "verdict_issued_at",
    "verdict_attested_at", "verdict_expires_at", "consecutive_failures", "next_poll_at", "updated_at",
)
_STORE: Final = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("p_id"), _DEVICES.c.lease_id == bindparam("p_lease_id"))
    .values({**{name: bindparam(f"p_{name}") for name in _STORED_COLUMNS},
             "lease_owner": None, "lease_id": None, "lease_expires_at": None})
)
_INSERT_ATTESTATION: Final = insert(_ATTESTATIONS)
_INSERT_ATTESTATION_RETURNING_ID: Final = insert(_ATTESTATIONS).returning(_ATTESTATIONS.c.id)
_INSERT_VERDICT: Final = insert(_TABLES[VerdictRecord.__tablename__])


class Poller:
    """Attest due devices continuously; see the module docstring. Safe to run several, in one
    process or many, against one database."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        client: AgentClient,
        options: PollerOptions,
        *,
        resolver: PolicyResolver | None = None,
        clock: Callable[[], datetime] = utc_now,
        nonce_source: Callable[[], str] = new_nonce,
        pruner: Pruner | None = None,
    ) -> None:
        self._sessions = sessions
        self._pruner = pruner
        self._client = client
        self.options = options
        self._resolver = resolver or PolicyResolver()
        self._clock = clock
        self._new_nonce = nonce_source
        self._engine: Engine = sessions.kw["bind"]
        self._postgresql = self._engine.dialect.name == "postgresql"
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

    # --- loops ---

    def run(self, stop: threading.Event) -> None:
        """Attest due devices until ``stop`` is set; then finish the attestations in flight."""
        threads = self.options.threads
        log.info("poller %s started: %d threads, agents reached over %s", self.options.poller_id,
                 threads, "mutual TLS" if self._client.mtls else "plain HTTP")
        # Prune passes run in their own thread, so that a long one never delays claims.
        pruning = self._pruner.start(stop) if self._pruner is not None else None
        in_flight: set[Future[None]] = set()
        with ThreadPoolExecutor(threads, thread_name_prefix="poller") as pool:
            while not stop.is_set():
                # Claim no more than the threads can start soon, so that claims do not wait
                # in the queue while their leases run down.
                limit = min(2 * threads - len(in_flight), self.options.batch_size)
                claims = self._claim_safely(limit) if limit > 0 else []
                for claim in claims:
                    in_flight.add(pool.submit(self.attest, claim))
                if limit > 0 and len(claims) == limit:
                    continue  # more may be due: claim again at once
                if in_flight:
                    idle = self.options.idle_wait
                    _, in_flight = wait(in_flight, timeout=idle, return_when=FIRST_COMPLETED)
                else:
                    stop.wait(self.options.idle_wait)
            wait(in_flight)
        if pruning is not None:
            pruning.join()
        log.info("poller %s stopped", self.options.poller_id)

    def run_once(self) -> int:
        """Attest every device due now, wait for all of them, and return how many there were."""
        claims: list[Claim] = []
        while True:
            batch = self.claim(self.options.batch_size)
            claims += batch
            if len(batch) < self.options.batch_size:
                break
        if not claims:
            return 0
        with ThreadPoolExecutor(self.options.threads, thread_name_prefix="poller") as pool:
            list(pool.map(self.attest, claims))
        return len(claims)

    def _claim_safely(self, limit: int) -> list[Claim]:
        try:
            return self.claim(limit)
        except Exception:  # noqa: BLE001 - a database outage must not end the poller; it retries
            log.exception("poller %s cannot claim devices; retrying", self.options.poller_id)
            self._count("claim_failures")
            time.sleep(self.options.idle_wait)
            return []

    # --- claim ---

    def claim(self, limit: int) -> list[Claim]:
        """Claim up to ``limit`` due devices, earliest first, and load what attesting them needs.

        Uses SQLAlchemy Core rather than ORM entities: this runs for every attestation, and
        the unit of work cost more than the database round trips.
        """
        now = self._clock()
        lease_id = str(uuid.uuid4())
        lease_expires_at = now + timedelta(seconds=self.options.lease_seconds)
        due = _DUE_SKIP_LOCKED if self._postgresql else _DUE

        with self._engine.begin() as connection:
            rows = connection.execute(due, {"p_now": now, "p_limit": limit}).all()
            if not rows:
                return []
            claimed = set(connection.scalars(_LEASE, {
                "p_ids": [row.id for row in rows], "p_now": now, "p_owner": self.options.poller_id,
                "p_lease_id": lease_id, "p_lease_expires_at": lease_expires_at,
            }))
            rows = [row for row in rows if row.id in claimed]
            with Session(bind=connection) as session:
                policies = self._resolver.load_many(session, rows)
        return [self._claim_of(row, policies[row.device_id], lease_id, lease_expires_at) for row in rows]

    def _claim_of(self, row: Any, policies: PolicySet | Finding, lease_id: str,
                  lease_expires_at: datetime) -> Claim:
        """Build the claim of one row of ``_CLAIM_COLUMNS``."""
        claim = Claim(
            device_pk=row.id,
            device_id=row.device_id,
            lease_id=lease_id,
            scheduled_at=as_utc(row.next_poll_at),
            lease_expires_at=lease_expires_at,
            contact=AgentContact(row.device_id, row.ip, row.port, row.mtls_cert),
            poll_interval=row.poll_interval,
            consecutive_failures=row.consecutive_failures,
            verdict_key=(row.verdict_status, tuple(reason["code"] for reason in row.verdict_reasons)),
            verdict_expires_at=as_utc(row.verdict_expires_at) if row.verdict_expires_at else None,
            state=self._state_of(row),
        )
        if not row.active:
            return replace(claim, blocked=_warning(
                DEVICE_NOT_ACTIVE, "the registrar has a pending credential challenge for this device "
                "and no proven AK; waiting until it activates"))
        if isinstance(policies, Finding):
            return replace(claim, blocked=policies)
        try:
            enrollment = enrollment_of(row.device_id, row.aik_tpm, row.ek_tpm)
        except EvidenceError as error:
            log.error("the registrar's AK or EK of the device cannot be parsed: %s", error,
                      extra={"device_id": row.device_id})
            return replace(claim, blocked=_warning("enrollment-invalid", f"the registrar's AK or EK "
                                                   f"cannot be parsed: {error.message}"))
        return replace(claim, enrollment=enrollment, policies=policies)

    def _state_of(self, device: Any) -> DeviceState | None:
        if device.state is None:
            return None
        try:
            return DeviceState.from_json(device.state)
        except VerifierError as error:
            # The next attestation starts a fresh session: IMA from entry 0, counters unknown.
            log.error("stored state is unusable, starting from scratch: %s", error,
                      extra={"device_id": device.device_id})
            return None

    # --- attest ---

    def attest(self, claim: Claim) -> None:
        """Attest one claimed device and store the outcome.

        Catches every exception, so that one device cannot stop the thread pool: a fault of
        edgetrust is logged at ERROR and the device is released for a later retry.
        """
        started_at = self._clock()
        remaining = (claim.lease_expires_at - started_at).total_seconds()
        if remaining < self.options.max_attestation_seconds:
            # Another poller may claim the device before this attestation could finish.
            log.warning("claim expires in %.1f s, too soon to attest; leaving the device to the "
                        "next claim", remaining, extra={"device_id": claim.device_id})
            self._count("claims_expired")
            return
        try:
            outcome = self._run(claim, started_at)
            self._store(claim, outcome, started_at)
        except _LeaseLost:
            log.warning("claim lost before the result was stored (device removed, or claimed by "
                        "another poller after the lease expired); result discarded",
                        extra={"device_id": claim.device_id})
            self._count("leases_lost")
        except Exception:  # noqa: BLE001 - a fault in edgetrust must not stop the other devices
            log.exception("attestation failed in edgetrust itself; retrying after the poll interval",
                          extra={"device_id": claim.device_id})
            self._count("faults")
            self._release_after_fault(claim)

    def _run(self, claim: Claim, started_at: datetime) -> _Outcome:
        if claim.blocked is not None or claim.enrollment is None:
            finding = claim.blocked or _warning(DEVICE_NOT_ACTIVE, "no enrollment")
            verdict = unknown_verdict(claim.contact.device_id, finding.code, finding.message,
                                      issued_at=started_at)
            return _Outcome(verdict, (finding,), claim.state, True, None, None, {})

        state = claim.state
        restarted = False
        while True:
            offset = state.ima.next_index if state is not None else 0
            pcrs = requested_pcrs(claim.policies)
            nonce = self._new_nonce()
            challenge = Challenge(nonce.encode("ascii"), pcrs, offset, self._clock())
            try:
                evidence = self._client.request_quote(claim.contact, nonce=nonce, mask=pcr_mask(pcrs),
                                                      ima_ml_entry=offset)
            except AgentError as error:
                return self._unreachable(claim, error, nonce, offset)

            result = verify(evidence, claim.enrollment, claim.policies, state, challenge=challenge,
                            now=self._clock(), poll_interval=claim.poll_interval, options=self.options.engine)
            if restarted or not any(f.code == IMA_LIST_RESTART_NEEDED for f in result.findings):
                break
            state, restarted = result.next_state, True

        summary = _evidence_summary(evidence, pcrs, result, restarted)
        return _Outcome(result.verdict, result.findings, result.next_state, True, nonce, offset, summary)

    def _unreachable(self, claim: Claim, error: AgentError, nonce: str, offset: int) -> _Outcome:
        finding = _warning(error.code, error.message)
        verdict = unknown_verdict(claim.contact.device_id, error.code, error.message, issued_at=self._clock())
        return _Outcome(verdict, (finding,), claim.state, False, nonce, offset, {})

    # --- store ---

    def _store(self, claim: Claim, outcome: _Outcome, started_at: datetime) -> None:
        # verifier.notify imports this module's time helpers, so it is imported here.
        from verifier.notify import PreviousVerdict, enqueue_verdict_change

        finished_at = self._clock()
        failures = 0 if outcome.reached else claim.consecutive_failures + 1
        next_poll_at = self._next_poll_at(claim, failures, finished_at)
        verdict = outcome.verdict
        reasons = [reason.to_json() for reason in verdict.reasons]
        state = outcome.next_state

        stored = {
            "state": state.to_json() if state is not None else None,
            "verdict_id": str(verdict.verdict_id),
            "verdict_status": verdict.status.value,
            "verdict_reasons": reasons,
            "verdict_policies": [policy.to_json() for policy in verdict.policies],
            "verdict_issued_at": verdict.issued_at,
            "verdict_attested_at": verdict.attested_at,
            "verdict_expires_at": verdict.expires_at,
            "consecutive_failures": failures,
            "next_poll_at": next_poll_at,
            "updated_at": finished_at,
        }
        attestation = {
            "device_id": claim.device_id,
            "verdict_id": str(verdict.verdict_id),
            "status": verdict.status.value,
            "poller": self.options.poller_id,
            "nonce": outcome.nonce,
            "scheduled_at": claim.scheduled_at,
            "started_at": started_at,
            "finished_at": finished_at,
            "boot_session": state.boot.reset_count if state is not None and state.boot else None,
            "ima_start_index": outcome.ima_start_index,
            "ima_next_index": state.ima.next_index if state is not None else None,
            "evidence": outcome.evidence,
            "findings": [finding.to_json() for finding in outcome.findings],
        }
        changed = (verdict.status.value, tuple(r["code"] for r in reasons)) != claim.verdict_key

        with self._engine.begin() as connection:
            parameters = {f"p_{name}": value for name, value in stored.items()}
            updated = connection.execute(_STORE, {**parameters, "p_id": claim.device_pk,
                                                  "p_lease_id": claim.lease_id})
            if updated.rowcount != 1:
                raise _LeaseLost
            if changed:
                inserted = connection.execute(_INSERT_ATTESTATION_RETURNING_ID, attestation)
                attestation_id = inserted.scalar_one()
                connection.execute(_INSERT_VERDICT, _verdict_record(verdict, reasons, attestation_id))
            else:
                connection.execute(_INSERT_ATTESTATION, attestation)
            # In the same transaction, so a verdict change is never stored without its webhook
            # notifications. It decides itself whether anything changed (expiry included).
            enqueue_verdict_change(
                connection, verdict,
                PreviousVerdict(claim.verdict_key[0], claim.verdict_key[1], claim.verdict_expires_at),
                now=finished_at,
            )

        self._report(claim, outcome, changed, next_poll_at)

    def _next_poll_at(self, claim: Claim, failures: int, now: datetime) -> datetime:
        interval = claim.poll_interval
        if failures:
            delay = min(interval * 2 ** (failures - 1), max(self.options.backoff_max, interval))
            return now + timedelta(seconds=delay)
        # Keep the device's cadence; a device whose turn has already passed is due at once.
        return max(claim.scheduled_at + timedelta(seconds=interval), now)

    def _report(self, claim: Claim, outcome: _Outcome, changed: bool, next_poll_at: datetime) -> None:
        verdict = outcome.verdict
        device_id = claim.contact.device_id
        self._count(f"attestations_{verdict.status.value}")
        if not outcome.reached:
            self._count("agents_unreachable")
        codes = ", ".join(reason.code for reason in verdict.reasons) or "none"
        if not changed:
            log.debug("verdict %s again (reasons: %s)", verdict.status.value, codes,
                      extra={"device_id": device_id})
            return
        level = logging.INFO if verdict.status is VerdictStatus.TRUSTED else logging.WARNING
        log.log(level, "verdict %s, was %s (reasons: %s); verdict %s, next attestation at %s",
                verdict.status.value, claim.verdict_key[0], codes, verdict.verdict_id,
                next_poll_at.isoformat(), extra={"device_id": device_id})

    def _release_after_fault(self, claim: Claim) -> None:
        retry_at = self._clock() + timedelta(seconds=self.options.idle_wait * 10)
        try:
            with transaction(self._sessions) as session:
                session.execute(
                    update(VerifierDevice)
                    .where(VerifierDevice.id == claim.device_pk, VerifierDevice.lease_id == claim.lease_id)
                    .values(lease_owner=None, lease_id=None, lease_expires_at=None, next_poll_at=retry_at)
                    .execution_options(synchronize_session=False)
                )
        except Exception:  # noqa: BLE001 - the lease then expires by itself
            log.exception("cannot release the claim after a fault; it expires at %s",
                          claim.lease_expires_at.isoformat(), extra={"device_id": claim.device_id})

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1


def _warning(code: str, message: str) -> Finding:
    return Finding(code, Severity.WARNING, message)


def _verdict_record(verdict: Verdict, reasons: list[dict[str, str]], attestation_id: int) -> dict[str, Any]:
    """Return the ``verifier_verdicts`` row of a verdict that changed the device's status or reasons."""
    return {
        "verdict_id": str(verdict.verdict_id),
        "device_id": verdict.device_id,
        "status": verdict.status.value,
        "reasons": reasons,
        "policies": [policy.to_json() for policy in verdict.policies],
        "issued_at": verdict.issued_at,
        "attested_at": verdict.attested_at,
        "expires_at": verdict.expires_at,
        "attestation_id": attestation_id,
    }


def _evidence_summary(evidence: Evidence, pcrs: frozenset[int], result: VerificationResult,
                      restarted: bool) -> dict[str, Any]:
    counters = result.next_state.counters
    summary: dict[str, Any] = {
        "quote": evidence.quote,
        "hash_alg": evidence.hash_alg,
        "pcrs": sorted(pcrs),
        "ima_measurement_list_entry": evidence.ima_start_index,
        "ima_entries_received": (evidence.ima_measurement_list or "").count("\n"),
        "mb_measurement_list_bytes": len(evidence.mb_measurement_list or b""),
        "restarted_from_entry_zero": restarted,
    }
    if counters is not None:
        summary["clock_info"] = {"clock": counters.clock, "reset_count": counters.reset_count,
                                 "restart_count": counters.restart_count, "safe": counters.safe}
    return summary



def build_poller(settings: Settings, sessions: sessionmaker[Session]) -> Poller:
    """Build a poller from the settings; raise SettingsError if they cannot work."""
    client = agent_client_from_settings(settings)
    if not client.mtls:
        log.warning("verifier_agent_mtls is false: agents are reached over plain HTTP. Quotes are "
                    "still verified with each device's AK, but the connection is not authenticated "
                    "and its contents can be read on the network")
    options = PollerOptions.from_settings(settings)
    retention = RetentionOptions.from_settings(settings)
    pruner = Pruner(sessions.kw["bind"], retention) if retention.interval > 0 else None
    return Poller(sessions, client, options, pruner=pruner)
