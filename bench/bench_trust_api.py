"""Measure trust API latency under an open-loop load of a fixed request rate.

Usage (from the repository root)::

    .venv/bin/python bench/bench_trust_api.py [--rate 500] [--duration 20] [--devices 200]
        [--workers 1] [--threads 8] [--database-url URL]

The script fills a fresh database (SQLite in a temporary directory unless ``--database-url``
names an empty PostgreSQL database) with ``--devices`` devices that have trusted verdicts,
each mapped to a node, and one read token. It starts ``edgetrust serve`` (gunicorn, gthread
workers) on a free port of 127.0.0.1 with the in-server poller off, and sends requests at
``--rate`` per second for ``--duration`` seconds:

- 80% ``GET /v1/devices/{id}/verdict`` for a random device,
- 15% ``POST /v1/verdicts:batch`` with 10 random node names,
- 5% ``GET /v1/devices/{id}/verdict?format=jws``.

The load is open-loop: request ``i`` is due at ``start + i / rate``, whatever happened to the
requests before it. Its latency runs from that due time to the end of the response, so time
spent queued behind slow requests counts (no coordinated omission). Requests run on
``--clients`` threads of this process with keep-alive connections; the client shares the
machine's cores with the server, so the figures include that contention. Every request
carries the bearer token, so each one also pays for the token lookup.

The run is bounded: at most ``rate * duration`` requests, and the script stops waiting for
responses 10 s after the last one is due.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402

from edgetrust.db import make_engine, make_session_factory, transaction, upgrade  # noqa: E402
from tests.verifier.test_trust_api import add_device, map_node, set_verdict  # noqa: E402
from verifier.tokens import Scope, create_token  # noqa: E402

STARTUP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 10.0
BATCH_NODES = 10


@dataclass(frozen=True)
class Sample:
    route: str
    latency_s: float
    status: int


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def prepare_database(database_url: str, devices: int) -> str:
    """Fill the database with trusted devices mapped to nodes; return a read token."""
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    for number in range(devices):
        add_device(sessions, f"car-{number}")
        set_verdict(sessions, f"car-{number}", "trusted", expires_in=3600)
        map_node(sessions, f"node-{number}", f"car-{number}")
    with transaction(sessions) as session:
        _, token = create_token(session, "bench", Scope.READ, now=datetime.now(UTC))
    engine.dispose()
    return token


@contextmanager
def edgetrust_serve(data_dir: Path, database_url: str, workers: int, threads: int) -> Iterator[str]:
    port = free_port()
    environment = {**os.environ, "EDGETRUST_DATA_DIR": str(data_dir), "EDGETRUST_DATABASE_URL": database_url,
                   "EDGETRUST_LISTEN_HOST": "127.0.0.1", "EDGETRUST_LISTEN_PORT": str(port),
                   "EDGETRUST_SERVER_WORKERS": str(workers), "EDGETRUST_SERVER_THREADS": str(threads),
                   "EDGETRUST_VERIFIER_POLL_IN_SERVER": "false", "EDGETRUST_LOG_LEVEL": "WARNING"}
    server_log = data_dir / "server.log"
    with server_log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "edgetrust", "serve"], env=environment,
                                   stdout=output, stderr=output, cwd=REPO_ROOT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise SystemExit(f"edgetrust serve exited: {server_log.read_text()[-2000:]}")
            try:
                if requests.get(base_url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"edgetrust serve did not start within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def choose_request(rng: random.Random, devices: int) -> tuple[str, str, str, dict | None]:
    """Return (route name, method, path, JSON body) of one request of the mix."""
    draw = rng.random()
    if draw < 0.80:
        return "verdict", "GET", f"/v1/devices/car-{rng.randrange(devices)}/verdict", None
    if draw < 0.95:
        nodes = [f"node-{rng.randrange(devices)}" for _ in range(BATCH_NODES)]
        return "batch-10-nodes", "POST", "/v1/verdicts:batch", {"nodes": nodes}
    return "verdict-jws", "GET", f"/v1/devices/car-{rng.randrange(devices)}/verdict?format=jws", None


def run_load(base_url: str, token: str, rate: float, duration: float, devices: int,
             clients: int) -> tuple[list[Sample], float]:
    """Send ``rate * duration`` requests open-loop; return the samples and the send span."""
    total = int(rate * duration)
    rng = random.Random(7)  # noqa: S311 - picking devices for a benchmark, not a secret
    plan = [choose_request(rng, devices) for _ in range(total)]
    jobs: queue.Queue[tuple[float, tuple[str, str, str, dict | None]] | None] = queue.Queue()
    samples: list[Sample] = []
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        while (job := jobs.get()) is not None:
            due, (route, method, path, body) = job
            try:
                response = session.request(method, base_url + path, json=body, timeout=DRAIN_TIMEOUT_S)
                status = response.status_code
            except requests.RequestException:
                status = 0
            with lock:
                samples.append(Sample(route, time.perf_counter() - due, status))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start = time.perf_counter() + 0.5
    for index, request in enumerate(plan):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        jobs.put((due, request))
    sent_span = time.perf_counter() - start
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join(timeout=DRAIN_TIMEOUT_S)
    return samples, sent_span


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(samples: list[Sample], sent_span: float, rate: float, duration: float) -> None:
    by_route: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        by_route[sample.route].append(sample.latency_s)
    errors = [sample for sample in samples if sample.status != 200]
    print(f"offered {rate:g} requests/s for {duration:g} s: {len(samples)} responses, "
          f"{len(errors)} not 200, last request sent {sent_span:.2f} s after the first")
    print("| route | requests | p50 | p99 | max |")
    print("|---|---|---|---|---|")
    everything = [sample.latency_s for sample in samples]
    for route, values in sorted(by_route.items()) + [("all", everything)]:
        print(f"| {route} | {len(values)} | {statistics.median(values) * 1000:.1f} ms | "
              f"{percentile(values, 0.99) * 1000:.1f} ms | {max(values) * 1000:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="Requests per second.")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds of load.")
    parser.add_argument("--devices", type=int, default=200, help="Devices with verdicts.")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes.")
    parser.add_argument("--threads", type=int, default=8, help="Threads per gunicorn worker.")
    parser.add_argument("--clients", type=int, default=64, help="Client threads of the load generator.")
    parser.add_argument("--database-url", help="Empty PostgreSQL database (default: SQLite).")
    arguments = parser.parse_args()
    if arguments.rate * arguments.duration > 100_000:
        parser.error("at most 100,000 requests per run")

    with tempfile.TemporaryDirectory(prefix="bench-trust-") as work:
        data_dir = Path(work)
        database_url = arguments.database_url or f"sqlite:///{data_dir / 'edgetrust.db'}"
        log(f"filling {database_url.split('@')[-1]} with {arguments.devices} devices")
        token = prepare_database(database_url, arguments.devices)
        with edgetrust_serve(data_dir, database_url, arguments.workers, arguments.threads) as base_url:
            log(f"edgetrust serve on {base_url}: {arguments.workers} worker(s) x {arguments.threads} "
                f"threads; {arguments.rate:g} requests/s for {arguments.duration:g} s")
            samples, sent_span = run_load(base_url, token, arguments.rate, arguments.duration,
                                          arguments.devices, arguments.clients)
        report(samples, sent_span, arguments.rate, arguments.duration)


if __name__ == "__main__":
    main()
