"""Measure enrollments per second (register and activate over HTTP) and MakeCredential time.

Usage (from the repository root)::

    .venv/bin/python bench/bench_registrar.py [--devices 300] [--clients 8]
        [--postgres-url postgresql+psycopg://user@127.0.0.1:port/postgres] [--server gunicorn]

For each database (SQLite, then PostgreSQL) and each EK type (RSA-2048, ECC P-256), the
script enrolls ``--devices`` new devices through a running server on 127.0.0.1, from
``--clients`` client threads. One enrollment is what an agent does: POST the registration,
run ActivateCredential on the blob, PUT the auth_tag. Each device has its own EK, AK and EK
certificate, made in software before the clock starts, so the TPM is not measured. The
client side of ActivateCredential runs in software with the EK's private key, in the same
process as the clients and on the same machine as the server.

``--server gunicorn`` (the default) runs ``edgetrust serve`` in a subprocess: gunicorn with
one gthread worker and the ``server_threads`` setting's 8 threads, as in production.
``--server threaded`` runs werkzeug's threaded development server in this process instead.

PostgreSQL: without ``--postgres-url`` the script starts a private cluster with
``scripts/postgres.sh`` in a temporary directory on a free port and stops it at the end. It
creates its own database on the server either way and drops it afterwards.

Also reported: the median time of ``evidence.credential.make_credential`` for an RSA-2048
and an ECC P-256 EK, in this process, over ``--makecredential-runs`` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from edgetrust.db import make_engine, upgrade  # noqa: E402
from evidence.credential import make_credential  # noqa: E402
from evidence.tpm import parse_tpm2b_public  # noqa: E402
from tests.registrar.helpers import SoftwareDevice  # noqa: E402
from tests.support import ekca  # noqa: E402

STARTUP_TIMEOUT_S = 30.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- Devices ------------------------------------------------------------------------------------


def make_devices(count: int, ek_kind: ekca.KeyKind, ca: ekca.TestCa) -> list[SoftwareDevice]:
    """Make ``count`` software devices with their own EK, ECC P-256 AK and EK certificate."""
    return [
        SoftwareDevice(ek_key=ekca.generate_key(ek_kind), ak_key=ekca.generate_key("ec-p256"), ca=ca)
        for _ in range(count)
    ]


@dataclass(frozen=True)
class RunResult:
    seconds: float
    latencies: list[float]
    failures: int


def enroll_all(base_url: str, devices: list[SoftwareDevice], clients: int) -> RunResult:
    """Enroll every device once from ``clients`` threads; return wall time and latencies."""
    local = threading.local()
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def enroll(device: SoftwareDevice) -> None:
        nonlocal failures
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        device_id = str(uuid.uuid4())
        started = time.perf_counter()
        response = session.post(f"{base_url}/v2.3/agents/{device_id}", json=device.body(),
                                timeout=60)
        ok = response.status_code == 200
        if ok:
            tag = device.auth_tag_for(response.json()["results"]["blob"], device_id)
            response = session.put(f"{base_url}/v2.3/agents/{device_id}",
                                   json={"auth_tag": tag}, timeout=60)
            ok = response.status_code == 200
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            if not ok:
                failures += 1
                log(f"enrollment of {device_id} failed: {response.status_code} {response.text[:200]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(enroll, devices))
    return RunResult(time.perf_counter() - started, latencies, failures)


# --- Servers and databases ----------------------------------------------------------------------


@contextlib.contextmanager
def gunicorn_server(database_url: str, bundle_dir: Path, work_dir: Path) -> Iterator[str]:
    """Run ``edgetrust serve`` on a free port; yield its base URL."""
    port = free_port()
    environment = {
        **os.environ,
        "EDGETRUST_DATA_DIR": str(work_dir),
        "EDGETRUST_DATABASE_URL": database_url,
        "EDGETRUST_EK_CA_DIR": str(bundle_dir),
        "EDGETRUST_LISTEN_HOST": "127.0.0.1",
        "EDGETRUST_LISTEN_PORT": str(port),
        # NOTE: the venv's editable install predates migrations/__init__.py and imports
        # `migrations` as a namespace package, which `edgetrust serve` cannot use. Putting the
        # repository first on the path imports the real package; `pip install -e .` fixes it.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    server_log = (work_dir / f"serve-{port}.log").open("wb")
    command = [str(Path(sys.executable).parent / "edgetrust"), "serve"]
    process = subprocess.Popen(command, env=environment, stdout=server_log, stderr=server_log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, Path(server_log.name))
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        server_log.close()


@contextlib.contextmanager
def threaded_server(database_url: str, bundle_dir: Path, work_dir: Path) -> Iterator[str]:
    """Run the app on werkzeug's threaded server in this process; yield its base URL."""
    from edgetrust.app import create_app
    from edgetrust.settings import Settings
    from tests.support.server import serving

    engine = make_engine(database_url)
    settings = Settings(data_dir=work_dir, database_url=database_url, ek_ca_dir=bundle_dir)
    try:
        with serving(create_app(settings, engine=engine)) as server:
            yield server.url
    finally:
        engine.dispose()


def wait_until_healthy(base_url: str, process: subprocess.Popen[bytes], server_log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"edgetrust serve exited with status {process.returncode}; "
                               f"see {server_log}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"edgetrust serve did not respond to /healthz within "
                       f"{STARTUP_TIMEOUT_S} s; see {server_log}")


@contextlib.contextmanager
def private_postgres(work_dir: Path) -> Iterator[str]:
    """Start a PostgreSQL cluster with scripts/postgres.sh; yield its admin URL."""
    cluster_dir = work_dir / "postgres"
    script = REPO_ROOT / "scripts" / "postgres.sh"
    port = free_port()
    url = subprocess.run([str(script), "start", str(cluster_dir), str(port)], check=True,
                         capture_output=True, text=True, timeout=120).stdout.strip()
    try:
        yield url
    finally:
        subprocess.run([str(script), "stop", str(cluster_dir)], check=False, timeout=120)


@contextlib.contextmanager
def bench_database(admin_url: str) -> Iterator[str]:
    """Create a fresh database on the PostgreSQL server; yield its URL and drop it afterwards."""
    name = f"edgetrust_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def migrate(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


# --- MakeCredential -----------------------------------------------------------------------------


def time_make_credential(ek_kind: ekca.KeyKind, runs: int) -> float:
    """Return the median seconds of one make_credential call for an EK of ``ek_kind``."""
    device = SoftwareDevice(ek_key=ekca.generate_key(ek_kind), ak_key=ekca.generate_key("ec-p256"),
                            ca=None)
    ek_public = parse_tpm2b_public(device.ek_tpm)
    ak_name = parse_tpm2b_public(device.aik_tpm).name
    secret = b"0123456789abcdefghijklmnopqrstuv"
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        make_credential(ek_public, ak_name, secret)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


# --- Main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=300,
                        help="devices enrolled per database and EK type (default 300)")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent client threads (default 8)")
    parser.add_argument("--server", choices=("gunicorn", "threaded"), default="gunicorn",
                        help="gunicorn through `edgetrust serve` (default) or werkzeug's "
                        "threaded server in this process")
    parser.add_argument("--postgres-url", help="admin URL of a PostgreSQL server; default: "
                        "start a private cluster with scripts/postgres.sh")
    parser.add_argument("--databases", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--makecredential-runs", type=int, default=2000,
                        help="make_credential calls timed per EK type (default 2000)")
    arguments = parser.parse_args()

    rows: list[str] = []
    with contextlib.ExitStack() as stack:
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-registrar-")))
        databases = Databases(stack, arguments.postgres_url, work_dir)
        os.chmod(work_dir, 0o755)  # scripts/postgres.sh runs the cluster as user postgres
        bundle_dir = work_dir / "ek-ca"
        bundle_dir.mkdir()
        ca = ekca.root_ca("Bench EK Root CA", "ec-p256")
        (bundle_dir / "root.pem").write_bytes(ca.pem())

        ek_kinds: list[tuple[str, ekca.KeyKind]] = [("RSA-2048", "rsa-2048"), ("ECC P-256", "ec-p256")]
        log(f"making {len(ek_kinds) * arguments.devices} software devices")
        devices = {label: make_devices(arguments.devices, kind, ca) for label, kind in ek_kinds}

        server = gunicorn_server if arguments.server == "gunicorn" else threaded_server
        for database in arguments.databases.split(","):
            for label, _ in ek_kinds:
                with databases.fresh(database.strip()) as url:
                    migrate(url)
                    with server(url, bundle_dir, work_dir) as base_url:
                        log(f"{database} {label}: enrolling {arguments.devices} devices from "
                            f"{arguments.clients} clients via {arguments.server}")
                        result = enroll_all(base_url, devices[label], arguments.clients)
                rows.append(format_row(database, label, arguments, result))

        credential_rows = []
        for label, kind in ek_kinds:
            median = time_make_credential(kind, arguments.makecredential_runs)
            credential_rows.append(f"| {label} | {median * 1e6:.0f} µs |")

    print("| database | EK | server | devices | clients | wall time | enrollments/s "
          "| median register + activate | failures |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    print()
    print(f"| EK | median make_credential ({arguments.makecredential_runs} calls) |")
    print("|---|---|")
    for row in credential_rows:
        print(row)
    return 0


class Databases:
    """Fresh databases for each run; a private PostgreSQL cluster is started on first use."""

    def __init__(self, stack: contextlib.ExitStack, postgres_url: str | None,
                 work_dir: Path) -> None:
        self._stack = stack
        self._postgres_url = postgres_url
        self._work_dir = work_dir

    @contextlib.contextmanager
    def fresh(self, database: str) -> Iterator[str]:
        """Yield the URL of a new, empty database of kind ``database``."""
        if database == "sqlite":
            yield f"sqlite:///{self._work_dir / f'bench-{uuid.uuid4().hex[:8]}.db'}"
            return
        if database != "postgresql":
            raise SystemExit(f"unknown database {database!r}; use sqlite or postgresql")
        if self._postgres_url is None:
            log("starting a private PostgreSQL cluster with scripts/postgres.sh")
            self._postgres_url = self._stack.enter_context(private_postgres(self._work_dir))
        with bench_database(self._postgres_url) as url:
            yield url


def format_row(database: str, label: str, arguments: argparse.Namespace, result: RunResult) -> str:
    rate = len(result.latencies) / result.seconds
    median_ms = statistics.median(result.latencies) * 1000
    return (f"| {database} | {label} | {arguments.server} | {len(result.latencies)} | "
            f"{arguments.clients} | {result.seconds:.2f} s | {rate:.0f} | {median_ms:.1f} ms | "
            f"{result.failures} |")


if __name__ == "__main__":
    sys.exit(main())

