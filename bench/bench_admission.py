"""Measure admission decisions per second and their latency, with a warm and a cold signature
cache, against a real registry on 127.0.0.1.

Usage (from the repository root)::

    .venv/bin/python bench/bench_admission.py [--requests 400] [--clients 8] [--images 20]
        [--postgres-url postgresql+psycopg://user@127.0.0.1:port/postgres]

The script starts the Debian docker-registry on a free port of 127.0.0.1, pushes images of
one random layer and signs them with a fresh ECDSA P-256 key (cosign's ``.sig`` tag format,
or Sigstore bundle referrers for the bundle row). It then runs ``edgetrust serve`` (gunicorn,
one gthread worker with 8 threads) in a subprocess on a new migrated database holding the
image-signature policy and one trusted device mapped to the node the pods name.

Every request is an AdmissionReview for a pod CREATE with ``spec.nodeName`` set and one
image, sent over HTTP from ``--clients`` threads, so each decision reads the node's verdict
from the database and checks one image signature.

- warm: ``--images`` images, each admitted once before the clock starts, then ``--requests``
  requests cycling over them: every signature check is a cache hit.
- cold: ``--requests`` images never seen before, one per request: every check reads the
  signature tag (or the referrers index), the signature manifest or bundle, and verifies.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402

from edgetrust.db import make_engine, make_session_factory, transaction, upgrade  # noqa: E402
from tests.support.registry import (  # noqa: E402
    PushedImage,
    Registry,
    free_port,
    generate_key,
    policy_document,
    running_registry,
)
from tests.verifier.test_admission import add_device, pod_review  # noqa: E402
from verifier import policy_store  # noqa: E402

STARTUP_TIMEOUT_S = 30.0
NODE = "node-bench"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    name: str
    database: str
    requests: int
    seconds: float
    latencies: list[float]

    def report(self) -> str:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (f"| {self.database} | {self.name} | {self.requests} | "
                f"{self.requests / self.seconds:.0f} | {statistics.median(ordered) * 1000:.1f} ms | "
                f"{p99 * 1000:.1f} ms |")


# --- set-up -------------------------------------------------------------------------------------


def push_signed(registry: Registry, count: int, key: object, bundle: bool) -> list[PushedImage]:
    images = []
    for _ in range(count):
        image = registry.push_image("donkeycar/car")
        if bundle:
            registry.sign_bundle(image, key)  # type: ignore[arg-type] # a PrivateKey
        else:
            registry.sign_simple(image, key)  # type: ignore[arg-type] # a PrivateKey
        images.append(image)
    return images


def prepare_database(url: str, registry: Registry, key: object) -> None:
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        policy_store.put_policy(session, "image-signature", "image-signature", policy_document(
            {"release": key}, {f"{registry.host}/donkeycar/*": ["release"]}))  # type: ignore[dict-item]
        add_device(session, "car-bench", "trusted", node=NODE, expires_in=3600)
    engine.dispose()


@contextlib.contextmanager
def serving(url: str, registry: Registry, workdir: Path) -> Iterator[str]:
    port = free_port()
    environment = {
        **os.environ,
        "EDGETRUST_DATA_DIR": str(workdir),
        "EDGETRUST_DATABASE_URL": url,
        "EDGETRUST_API_AUTH": "false",
        "EDGETRUST_REGISTRY_PLAIN_HTTP": registry.host,
        "EDGETRUST_VERIFIER_POLL_IN_SERVER": "false",
        "EDGETRUST_LOG_LEVEL": "INFO",
    }
    server_log = (workdir / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgetrust", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT, env=environment, stdout=server_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"edgetrust serve did not start; see {workdir / 'serve.log'}")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        server_log.close()


# --- measuring ----------------------------------------------------------------------------------


def admit(session: requests.Session, base: str, image: PushedImage) -> float:
    body = pod_review([image.pinned], node=NODE, name=f"car-{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    response = session.post(f"{base}/v1/admission", json=body, timeout=30)
    elapsed = time.perf_counter() - started
    review_response = response.json()["response"]
    if response.status_code != 200 or review_response["allowed"] is not True:
        raise RuntimeError(f"admission denied {image.pinned}: {review_response}")
    return elapsed


def run(base: str, images: list[PushedImage], clients: int) -> tuple[float, list[float]]:
    sessions = [requests.Session() for _ in range(clients)]

    def one(index: int) -> float:
        return admit(sessions[index % clients], base, images[index])

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(one, range(len(images))))
    return time.perf_counter() - started, latencies


def measure(database: str, url: str, arguments: argparse.Namespace, workdir: Path) -> list[Row]:
    rows = []
    with running_registry() as registry:
        key = generate_key()
        log(f"pushing and signing {arguments.images + 2 * arguments.requests} images")
        warm_images = push_signed(registry, arguments.images, key, bundle=False)
        cold_simple = push_signed(registry, arguments.requests, key, bundle=False)
        cold_bundle = push_signed(registry, arguments.requests, key, bundle=True)
        prepare_database(url, registry, key)

        with serving(url, registry, workdir) as base:
            # Warm-up: the first request of each client opens its connection, and every warm
            # image is checked once so that its signature is cached.
            run(base, warm_images, arguments.clients)
            cycled = [warm_images[i % len(warm_images)] for i in range(arguments.requests)]

            log(f"{database}: warm cache")
            seconds, latencies = run(base, cycled, arguments.clients)
            rows.append(Row("warm cache", database, len(cycled), seconds, latencies))

            log(f"{database}: cold cache, .sig tag")
            seconds, latencies = run(base, cold_simple, arguments.clients)
            rows.append(Row("cold cache, .sig tag", database, len(cold_simple), seconds, latencies))

            log(f"{database}: cold cache, bundle referrer")
            seconds, latencies = run(base, cold_bundle, arguments.clients)
            rows.append(Row("cold cache, bundle referrer", database, len(cold_bundle), seconds,
                            latencies))
    return rows


@contextlib.contextmanager
def postgres_database(admin_url: str | None, workdir: Path) -> Iterator[str]:
    """Yield the URL of a new database on ``admin_url`` or on a private cluster."""
    from tests.support.database import fresh_database

    if admin_url is not None:
        os.environ["EDGETRUST_TEST_POSTGRES_URL"] = admin_url
        with fresh_database("postgresql", workdir) as url:
            yield url
        return

    # A directory of its own: the postgres user must be able to enter it.
    cluster = Path(tempfile.mkdtemp(prefix="edgetrust-bench-pg-"))
    port = free_port()
    started = subprocess.run(["bash", "scripts/postgres.sh", "start", str(cluster), str(port)],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    try:
        os.environ["EDGETRUST_TEST_POSTGRES_URL"] = started.stdout.strip()
        with fresh_database("postgresql", workdir) as url:
            yield url
    finally:
        subprocess.run(["bash", "scripts/postgres.sh", "stop", str(cluster)], cwd=REPO_ROOT,
                       capture_output=True, check=False)
        shutil.rmtree(cluster, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per row")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--images", type=int, default=20, help="distinct images of the warm row")
    parser.add_argument("--databases", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql")
    parser.add_argument("--postgres-url", help="admin URL of a running PostgreSQL server")
    arguments = parser.parse_args()

    rows: list[Row] = []
    for database in arguments.databases.split(","):
        with tempfile.TemporaryDirectory(prefix="edgetrust-bench-") as directory:
            workdir = Path(directory)
            if database == "sqlite":
                rows += measure("SQLite", f"sqlite:///{workdir / 'edgetrust.db'}", arguments, workdir)
            else:
                with postgres_database(arguments.postgres_url, workdir) as url:
                    rows += measure("PostgreSQL", url, arguments, workdir)

    print("| database | signature cache | requests | decisions/s | median | p99 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row.report())


if __name__ == "__main__":
    main()
