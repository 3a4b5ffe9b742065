"""Measure the verifier: the cost of one attestation, and a simulated fleet at a 10-second interval.

Usage (from the repository root)::

    .venv/bin/python bench/bench_verifier.py [--single-runs 2000] [--devices 100,1000]
        [--interval 10] [--warmup 30] [--duration 60] [--threads 8] [--no-tls]
        [--postgres-url postgresql+psycopg://user@127.0.0.1:port/postgres]

Part 1, one attestation inside the verifier without the network. A simulated device
(``verifier.fleet_sim``, software AK) logs 20 new IMA entries before each quote; its files are
listed in a runtime policy of 200,000 digests. Responses are made beforehand, so the figures
leave out the device's work and the network. Rows:

- ``engine.verify``: the pure function: quote check (signature, nonce, PCR selection and
  digest, counters), replay of the 20 entries to the quoted PCR 10 and their runtime policy
  evaluation (the compiled policy comes from the cache by content hash).
- ``claim + load + verify + store``: ``Poller.claim`` and ``Poller.attest`` with an in-process
  agent client: one transaction to claim, one to load the device, registrar row, policy
  version and state, the engine, and one transaction that writes the attestation, the state
  and the verdict. Once per database.

Part 2, a fleet. ``python -m verifier.fleet_sim`` serves N Keylime agent endpoints in one
process on 127.0.0.1 (mutual TLS unless ``--no-tls``), each quoting with a software AK and
logging 2 new IMA entries per quote. ``edgetrust poll`` runs in its own process with
``--threads`` attestation threads on PostgreSQL. The devices' first due times are spread over
one interval. After ``--warmup`` seconds (first attestations replay the whole list and make
the TLS connections), the script counts the attestations that start within ``--duration``
seconds and reads their lateness: start of the attestation minus the time it was due.
Memory per device is the growth of the poller's resident set size between the smallest and
the largest fleet, divided by the difference in devices.

PostgreSQL: without ``--postgres-url`` the script starts a private cluster with
``scripts/postgres.sh`` in a temporary directory on a free port and stops it at the end. It
creates a new database for each run and drops it afterwards. The script makes no assertions
about timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import Engine, func, select, text, update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from edgetrust.db import make_engine, make_session_factory, transaction, upgrade  # noqa: E402
from registrar.models import RegisteredDevice  # noqa: E402
from verifier import policy_store  # noqa: E402
from verifier.agent_client import AgentContact  # noqa: E402
from verifier.api import AddDeviceRequest, VerifierService  # noqa: E402
from verifier.engine import (  # noqa: E402
    Challenge,
    EngineOptions,
    Enrollment,
    Evidence,
    Loaded,
    PolicySet,
    pcr_mask,
    requested_pcrs,
    verify,
)
from verifier.fleet_sim import SimulatedDevice, make_files, runtime_policy_document  # noqa: E402
from verifier.models import Attestation, VerifierDevice  # noqa: E402
from verifier.poller import Poller, PollerOptions, new_nonce  # noqa: E402
from verifier.verdicts import AppliedPolicy  # noqa: E402

POLICY_DIGESTS = 200_000
DEVICE_FILES = 200
NEW_ENTRIES = 20


# --- PostgreSQL ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def postgres_server(url: str | None) -> Iterator[str]:
    """Yield an admin URL: the given one, or a private cluster's, stopped afterwards."""
    if url:
        yield url
        return
    directory = tempfile.mkdtemp(prefix="edgetrust-bench-pg-")
    script = str(REPO_ROOT / "scripts" / "postgres.sh")
    started = subprocess.run(
        ["bash", script, "start", directory, str(free_port())], check=True, capture_output=True, text=True
    )
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run(["bash", script, "stop", directory], check=False)
        subprocess.run(["rm", "-rf", directory], check=False)


@contextlib.contextmanager
def fresh_database(kind: str, admin_url: str, directory: Path) -> Iterator[str]:
    if kind == "sqlite":
        path = directory / f"bench-{uuid.uuid4().hex[:8]}.db"
        yield f"sqlite:///{path}"
        return
    name = f"edgetrust_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- Shared set-up -----------------------------------------------------------------------------


def policy_document(files: dict[str, bytes]) -> dict[str, Any]:
    return runtime_policy_document(files, extra_digests=POLICY_DIGESTS - len(files))


def prepare_database(url: str, files: dict[str, bytes]) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(url, pool_size=12, pool_pre_ping=False)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        policy_store.put_policy(session, "fleet", "runtime", policy_document(files))
    return engine, sessions


def register(
    session: Session, device_id: str, ak_tpm: bytes, ek_tpm: bytes, port: int, mtls_cert: str | None
) -> None:
    now = datetime.now(UTC)
    session.add(
        RegisteredDevice(
            device_id=device_id,
            ek_tpm=ek_tpm,
            ekcert=None,
            aik_tpm=ak_tpm,
            ip="127.0.0.1",
            port=port,
            mtls_cert=mtls_cert or "disabled",
            regcount=1,
            active=True,
            failed_activations=0,
            created_at=now,
            registered_at=now,
            activated_at=now,
        )
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- Part 1: one attestation ----------------------------------------------------------------------


@dataclass
class PreparedResponse:
    nonce: str
    offset: int
    evidence: Evidence


def prepare_responses(device: SimulatedDevice, pcrs: frozenset[int], count: int) -> list[PreparedResponse]:
    """Ask the device for ``count`` quotes, each after 20 new entries, as the poller would."""
    responses = []
    offset = 0
    for _ in range(count + 1):
        nonce = new_nonce()
        status, body = device.answer_quote(
            {"nonce": nonce, "mask": pcr_mask(pcrs), "partial": "1", "ima_ml_entry": str(offset)}
        )
        assert status == 200, body
        results = body["results"]
        evidence = Evidence(
            results["quote"],
            results["hash_alg"],
            results["ima_measurement_list"],
            results["ima_measurement_list_entry"],
        )
        responses.append(PreparedResponse(nonce, offset, evidence))
        offset = len(device.ima_lines)
    return responses


class PreparedClient:
    """An agent client that returns prepared responses in order, in this process."""

    mtls = False

    def __init__(self, responses: list[PreparedResponse]) -> None:
        self._responses = iter(responses)

    def request_quote(
        self, contact: AgentContact, *, nonce: str, mask: str, ima_ml_entry: int, partial: bool = True
    ) -> Evidence:
        response = next(self._responses)
        if response.nonce != nonce or response.offset != ima_ml_entry:
            raise RuntimeError("prepared responses ran out of step with the poller")
        return response.evidence


def new_device(files: dict[str, bytes]) -> SimulatedDevice:
    return SimulatedDevice(str(uuid.uuid4()), files=files, entries_per_quote=NEW_ENTRIES)


def bench_engine(files: dict[str, bytes], runs: int) -> list[float]:
    from policies.runtime import load_runtime_policy

    policy = load_runtime_policy(json.dumps(policy_document(files)))
    policies = PolicySet(runtime=Loaded(AppliedPolicy("runtime", "fleet", 1, policy.content_hash), policy))
    device = new_device(files)
    pcrs = requested_pcrs(policies)
    responses = prepare_responses(device, pcrs, runs)
    enrollment = Enrollment(device.device_id, device.tpm.ak_public, device.tpm.qualified_name)
    options = EngineOptions()
    now = datetime.now(UTC)

    first = responses[0]
    state = verify(
        first.evidence,
        enrollment,
        policies,
        None,
        challenge=Challenge(first.nonce.encode(), pcrs, 0, now),
        now=now,
        poll_interval=10.0,
        options=options,
    ).next_state
    times = []
    for response in responses[1:]:
        challenge = Challenge(response.nonce.encode(), pcrs, response.offset, now)
        started = time.perf_counter()
        result = verify(
            response.evidence,
            enrollment,
            policies,
            state,
            challenge=challenge,
            now=now,
            poll_interval=10.0,
            options=options,
        )
        times.append(time.perf_counter() - started)
        if result.verdict.status.value != "trusted":
            raise RuntimeError(f"engine run failed: {result.findings}")
        state = result.next_state
    return times


def bench_pipeline(
    kind: str, admin_url: str, directory: Path, files: dict[str, bytes], runs: int
) -> list[float]:
    device = new_device(files)
    with fresh_database(kind, admin_url, directory) as url:
        engine, sessions = prepare_database(url, files)
        with transaction(sessions) as session:
            register(session, device.device_id, device.tpm.ak_tpm, device.tpm.ek_tpm, 9002, None)
        clock = _StepClock(datetime.now(UTC))
        service = VerifierService(sessions, default_poll_interval=10.0, clock=clock)
        service.add_device(
            AddDeviceRequest(device.device_id, ip="127.0.0.1", port=9002, runtime_policy="fleet")
        )
        with sessions() as session:
            policies = PolicySet(
                runtime=Loaded(AppliedPolicy("runtime", "fleet", 1, ""), _load_policy(session))
            )
        responses = prepare_responses(device, requested_pcrs(policies), runs)
        nonces = iter([response.nonce for response in responses])
        options = PollerOptions(poller_id="bench", threads=1, batch_size=1)
        poller = Poller(
            sessions,
            PreparedClient(responses),  # type: ignore[arg-type]
            options,
            clock=clock,
            nonce_source=lambda: next(nonces),
        )

        times = []
        cpu_times = []
        for index in range(runs + 1):
            started = time.perf_counter()
            cpu_started = time.process_time()
            claims = poller.claim(1)
            poller.attest(claims[0])
            if index:
                times.append(time.perf_counter() - started)
                cpu_times.append(time.process_time() - cpu_started)
            clock.now += timedelta(seconds=10)
        trusted = poller.stats["attestations_trusted"]
        engine.dispose()
    if trusted != runs + 1:
        raise RuntimeError(f"pipeline run on {kind} trusted {trusted} of {runs + 1}: {poller.stats}")
    return times, cpu_times


def _load_policy(session: Session) -> Any:
    version = policy_store.latest(session, "fleet")
    return policy_store.compiled(session, version.content_hash)


class _StepClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --- Part 2: a fleet ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fleet simulator did not write {path}")
        time.sleep(0.2)


def seed_fleet(
    sessions: sessionmaker[Session], manifest: dict[str, Any], interval: float, start: datetime
) -> None:
    service = VerifierService(sessions, default_poll_interval=interval)
    with transaction(sessions) as session:
        for device in manifest["devices"]:
            register(
                session,
                device["device_id"],
                bytes.fromhex(device["ak_tpm"]),
                bytes.fromhex(device["ek_tpm"]),
                device["port"],
                device["mtls_cert"],
            )
    devices = manifest["devices"]
    for device in devices:
        service.add_device(
            AddDeviceRequest(
                device["device_id"],
                ip="127.0.0.1",
                port=device["port"],
                poll_interval=interval,
                runtime_policy="fleet",
            )
        )
    with transaction(sessions) as session:
        for index, device in enumerate(devices):
            due = start + timedelta(seconds=interval * index / len(devices))
            session.execute(
                update(VerifierDevice)
                .where(VerifierDevice.device_id == device["device_id"])
                .values(next_poll_at=due)
            )


def run_fleet(admin_url: str, directory: Path, count: int, arguments: argparse.Namespace) -> dict[str, Any]:
    manifest_path = directory / f"fleet-{count}.json"
    command = [
        sys.executable,
        "-m",
        "verifier.fleet_sim",
        "--devices",
        str(count),
        "--files",
        str(DEVICE_FILES),
        "--entries-per-quote",
        "2",
        "--manifest",
        str(manifest_path),
    ]
    if arguments.tls:
        command += ["--tls", str(directory / f"tls-{count}")]
    sim = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        wait_for(manifest_path, sim, timeout=600)
        manifest = json.loads(manifest_path.read_text())
        files = {path: bytes.fromhex(digest) for path, digest in manifest["files"].items()}
        with fresh_database("postgresql", admin_url, directory) as url:
            engine, sessions = prepare_database(url, files)
            start = datetime.now(UTC) + timedelta(seconds=5)
            seed_fleet(sessions, manifest, arguments.interval, start)
            return measure_poller(
                url,
                sessions,
                manifest,
                count,
                start,
                arguments,
                sim.pid,
                engine,
                directory / f"poller-{count}",
            )
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=60)


def measure_poller(
    url: str,
    sessions: sessionmaker[Session],
    manifest: dict[str, Any],
    count: int,
    start: datetime,
    arguments: argparse.Namespace,
    sim_pid: int,
    engine: Engine,
    data_dir: Path,
) -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGETRUST_")}
    env.update(
        {
            "EDGETRUST_DATABASE_URL": url,
            "EDGETRUST_DATA_DIR": str(data_dir),
            "EDGETRUST_LOG_LEVEL": "WARNING",
            "EDGETRUST_VERIFIER_POLLER_THREADS": str(arguments.threads),
            "EDGETRUST_VERIFIER_AGENT_MTLS": "true" if arguments.tls else "false",
        }
    )
    if arguments.tls:
        env["EDGETRUST_VERIFIER_TLS_CERT"] = manifest["client_cert"]
        env["EDGETRUST_VERIFIER_TLS_KEY"] = manifest["client_key"]
    edgetrust = str(Path(sys.executable).parent / "edgetrust")
    poller = subprocess.Popen([edgetrust, "poll"], env=env)
    window_start = start + timedelta(seconds=arguments.warmup)
    window_end = window_start + timedelta(seconds=arguments.duration)
    samples: list[int] = []
    try:
        _sleep_until(window_start)
        cpu_before = {pid: cpu_seconds(pid) for pid in (poller.pid, sim_pid)}
        while datetime.now(UTC) < window_end:
            samples.append(rss_kib(poller.pid))
            time.sleep(1.0)
        cpu_after = {pid: cpu_seconds(pid) for pid in (poller.pid, sim_pid)}
    finally:
        poller.send_signal(signal.SIGTERM)
        poller.wait(timeout=120)

    with sessions() as session:
        rows = session.execute(
            select(
                Attestation.scheduled_at, Attestation.started_at, Attestation.finished_at, Attestation.status
            ).where(Attestation.started_at >= window_start, Attestation.started_at < window_end)
        ).all()
        table_bytes = {
            name: session.scalar(text(f"SELECT pg_total_relation_size('{name}')"))
            for name in ("verifier_devices", "verifier_attestations")
        }
        all_rows = session.scalar(select(func.count()).select_from(Attestation))
    engine.dispose()

    lateness = [(row.started_at - row.scheduled_at).total_seconds() for row in rows]
    durations = [(row.finished_at - row.started_at).total_seconds() for row in rows]
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row.status] = statuses.get(row.status, 0) + 1
    return {
        "devices": count,
        "attestations": len(rows),
        "per_second": len(rows) / arguments.duration,
        "expected_per_second": count / arguments.interval,
        "statuses": statuses,
        "lateness_p50": percentile(lateness, 0.5),
        "lateness_p99": percentile(lateness, 0.99),
        "lateness_max": max(lateness),
        "duration_p50": percentile(durations, 0.5),
        "duration_p99": percentile(durations, 0.99),
        "poller_rss_mib": statistics.median(samples) / 1024,
        "poller_cpu": (cpu_after[poller.pid] - cpu_before[poller.pid]) / arguments.duration,
        "sim_cpu": (cpu_after[sim_pid] - cpu_before[sim_pid]) / arguments.duration,
        "device_row_bytes": table_bytes["verifier_devices"] / count,
        "attestation_row_bytes": table_bytes["verifier_attestations"] / max(1, all_rows or 0),
    }


def _sleep_until(moment: datetime) -> None:
    seconds = (moment - datetime.now(UTC)).total_seconds()
    if seconds > 0:
        time.sleep(seconds)


# --- Main -----------------------------------------------------------------------------------


def milliseconds(values: list[float]) -> str:
    return (
        f"median {statistics.median(values) * 1000:.2f} ms, p99 {percentile(values, 0.99) * 1000:.2f} ms "
        f"({len(values)} runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--single-runs", type=int, default=2000)
    parser.add_argument(
        "--devices", default="100,1000", help="fleet sizes, comma-separated; empty skips part 2"
    )
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--no-tls", dest="tls", action="store_false")
    parser.add_argument("--postgres-url")
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.devices.split(",") if size]

    files = make_files(DEVICE_FILES)
    print(
        f"engine.verify, 20 new entries, {POLICY_DIGESTS:,}-digest policy: "
        f"{milliseconds(bench_engine(files, arguments.single_runs))}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="edgetrust-bench-") as temporary,
        postgres_server(arguments.postgres_url) as admin_url,
    ):
        directory = Path(temporary)
        for kind in ("sqlite", "postgresql"):
            times, cpu_times = bench_pipeline(kind, admin_url, directory, files, arguments.single_runs)
            print(
                f"claim + load + verify + store on {kind}: {milliseconds(times)}; CPU of this "
                f"process: {milliseconds(cpu_times)}",
                flush=True,
            )

        results = [run_fleet(admin_url, directory, count, arguments) for count in sizes]
    for result in results:
        print(json.dumps(result, indent=1, default=str), flush=True)
    if len(results) >= 2:
        small, large = results[0], results[-1]
        growth = (
            (large["poller_rss_mib"] - small["poller_rss_mib"]) * 1024 / (large["devices"] - small["devices"])
        )
        print(
            f"poller memory per device: {growth:.1f} KiB "
            f"({small['devices']} devices: {small['poller_rss_mib']:.0f} MiB, "
            f"{large['devices']} devices: {large['poller_rss_mib']:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
