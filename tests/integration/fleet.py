"""Run edgetrust as a fleet runs it, for the integration tests: real processes on 127.0.0.1.

:class:`Fleet` owns everything a test starts, as children of the test process:

- ``edgetrust serve`` (:class:`ServerProcess`) on a free port. On SQLite it runs the poller
  itself; on PostgreSQL it runs none, and ``edgetrust poll`` workers attest the devices.
- ``edgetrust poll`` workers (:class:`EdgetrustProcess`).
- Emulated devices (:class:`Device`): a swtpm state provisioned with EK certificates by one
  local CA (``device.emulator``), a ``swtpm`` process, and ``edgetrust agent``, whose IMA
  simulator measures a directory of the device's files.

Each process appends its output to ``<workdir>/logs/<name>.log``. :meth:`Fleet.print_logs`
prints what the logs gained since :meth:`Fleet.log_marks`. The fixtures call it after every
test, and pytest shows that output only for a test that failed. :meth:`Fleet.close` stops
every process, newest first.

With ``mtls=True`` the verifier reaches the agents as the settings intend: each agent serves
HTTPS with the self-signed certificate it registered as ``mtls_cert`` and requires a client
certificate from ``agent_client_ca``, and the verifier presents a client certificate issued
by that CA (:class:`ClientPki`, made here with ``cryptography``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device.emulator import LocalCa, SwtpmProcess, provision_tpm_state

# Seconds; generous, because several test suites may share two cores.
START_TIMEOUT: Final = 90.0
STOP_TIMEOUT: Final = 30.0
COMMAND_TIMEOUT: Final = 90.0
REQUEST_TIMEOUT: Final = 30.0
LOG_TAIL_LINES: Final = 60
KEYLIME_API: Final = "v2.5"

# A quote request as the agent API's request log shows it.
_QUOTE_REQUEST: Final = re.compile(r"GET /v[0-9.]+/quotes/integrity\?\S*ima_ml_entry=(\d+)")

T = TypeVar("T")


class FleetError(AssertionError):
    """A process or a condition did not behave as the test expected."""


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], T | None], timeout: float, description: str,
               interval: float = 0.2) -> T:
    """Call ``condition`` until it returns something other than None or False; return that.

    Raises FleetError naming ``description`` and the last value seen after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise FleetError(f"timed out after {timeout:.1f} s waiting for {description} "
                             f"(last value: {value!r})")
        time.sleep(interval)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_time(text: str) -> dt.datetime:
    """Parse an ISO 8601 time from the API (UTC, with offset)."""
    return dt.datetime.fromisoformat(text)


# --- Processes --------------------------------------------------------------------------------


def clean_environment(values: Mapping[str, str]) -> dict[str, str]:
    """Return this process's environment without EDGETRUST_* variables, plus ``values``."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("EDGETRUST_")}
    environment.update({"TSS2_LOG": "all+none", "PYTHONUNBUFFERED": "1"})
    environment.update(values)
    return environment


@dataclass
class EdgetrustProcess:
    """One ``edgetrust`` command run as a child process, its output appended to ``log_path``.

    It can be stopped and started again; each start writes a marker line to the log.
    """

    name: str
    arguments: list[str]
    environment: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> EdgetrustProcess:
        if self.running:
            raise FleetError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log_file:
            log_file.write(f"=== start {self.starts}: edgetrust {' '.join(self.arguments)}\n"
                           .encode())
            log_file.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgetrust", *self.arguments],
                stdout=log_file, stderr=subprocess.STDOUT, env=self.environment,
                cwd=self.log_path.parent,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after STOP_TIMEOUT); return the status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        return process.returncode

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; return its status."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FleetError(f"{self.name} did not exit within {timeout:.0f} s") from None

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def current_log(self) -> str:
        """Return the log written since the latest start."""
        return self.log_text().rsplit("\n=== start ", 1)[-1]


def run_edgetrust(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one short ``edgetrust`` command; raise FleetError with its output unless it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "edgetrust", *arguments], env=environment, capture_output=True,
        text=True, timeout=COMMAND_TIMEOUT, check=False,
    )
    if result.returncode != 0:
        raise FleetError(f"edgetrust {' '.join(arguments)} exited with status "
                         f"{result.returncode}:\n{result.stdout}{result.stderr}")
    return result


# --- TLS material of the verifier -------------------------------------------------------------


@dataclass(frozen=True)
class ClientPki:
    """A CA that agents trust for client certificates, and the verifier's certificate from it."""

    ca_certificate: Path
    client_certificate: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> ClientPki:
        """Make an ECDSA P-256 CA and a client certificate (EKU clientAuth) that it signs."""
        directory.mkdir(parents=True, exist_ok=True)
        now = utc_now()
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetrust test verifier CA")])
        ca_certificate = (
            _certificate_builder(ca_name, ca_name, ca_key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetrust-verifier")])
        client_certificate = (
            _certificate_builder(client_name, ca_name, client_key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        pki = cls(directory / "verifier-ca.pem", directory / "verifier-client.pem",
                  directory / "verifier-client-key.pem")
        pki.ca_certificate.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
        pki.client_certificate.write_bytes(client_certificate.public_bytes(serialization.Encoding.PEM))
        pki.client_key.write_bytes(client_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        pki.client_key.chmod(0o600)
        return pki


def _certificate_builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
                         now: dt.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


# --- The server and its API -------------------------------------------------------------------


class ApiClient:
    """Calls the server's HTTP API with an admin API token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self._session = requests.Session()
        self._session.trust_env = False
        self._session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self._session.close()

    def request(self, method: str, path: str, *, expected: int = 200,
                allowed: Collection[int] = (), **kwargs: Any) -> Any:
        """Send a request; return its JSON body, or None for an empty one or an ``allowed``
        status. Raise FleetError for any other status than ``expected``."""
        response = self._session.request(method, self.base_url + path, timeout=REQUEST_TIMEOUT,
                                         **kwargs)
        if response.status_code in allowed:
            return None
        if response.status_code != expected:
            raise FleetError(f"{method} {path} returned {response.status_code}, expected "
                             f"{expected}: {response.text[:500]}")
        return response.json() if response.content else None

    def add_device(self, device_id: str, *, runtime_policy: str | None,
                   poll_interval: float, ip: str | None = None,
                   port: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"poll_interval": poll_interval}
        if runtime_policy is not None:
            body["runtime_policy"] = runtime_policy
        if ip is not None:
            body["cloudagent_ip"] = ip
        if port is not None:
            body["cloudagent_port"] = port
        result: dict[str, Any] = self.request("POST", f"/v1/devices/{device_id}", expected=201,
                                              json=body)
        return result

    def remove_device(self, device_id: str) -> None:
        self.request("DELETE", f"/v1/devices/{device_id}", expected=204)

    def device(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/devices/{device_id}")
        return result

    def verdict(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/devices/{device_id}/verdict")
        return result

    def status(self, device_id: str) -> str:
        return str(self.verdict(device_id)["status"])

    def attestations(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the newest ``limit`` attestations of the device, newest first."""
        result = self.request("GET", f"/v1/devices/{device_id}/attestations",
                              params={"limit": str(limit)})
        attestations: list[dict[str, Any]] = result["attestations"]
        return attestations

    def upload_policy(self, name: str, kind: str, document: Mapping[str, Any]) -> None:
        self.request("POST", f"/v1/policies/{name}", expected=201,
                     json={"kind": kind, "policy": document})

    def registration(self, device_id: str) -> dict[str, Any]:
        """Return the registrar's record of an active device (Keylime registrar API)."""
        result: dict[str, Any] = self.request("GET", f"/{KEYLIME_API}/agents/{device_id}")
        registration: dict[str, Any] = result["results"]
        return registration

    def delete_registration(self, device_id: str) -> None:
        self.request("DELETE", f"/{KEYLIME_API}/agents/{device_id}")


@dataclass
class ServerProcess:
    """``edgetrust serve`` on a fixed port; a restart keeps the port, so agents keep their
    registrar URL."""

    process: EdgetrustProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            if not self.process.running:
                raise FleetError(f"{self.process.name} exited with status "
                                 f"{self.process.returncode} while starting; see "
                                 f"{self.process.log_path}")
            try:
                return requests.get(self.url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(healthy, START_TIMEOUT, f"{self.url}/healthz")

    def stop(self) -> int | None:
        return self.process.stop()

    def start(self, **settings: str) -> None:
        """Start the server again, with ``settings`` (see :meth:`Fleet.start_server`) changed."""
        self.process.environment.update(_variables(settings))
        self.process.start()
        self.wait_healthy()

    def restart(self, **settings: str) -> None:
        self.stop()
        self.start(**settings)


# --- Devices ----------------------------------------------------------------------------------


@dataclass
class Device:
    """An emulated device: a provisioned swtpm state, its swtpm, and ``edgetrust agent``.

    ``files_dir`` contains the files that the IMA simulator measures. The agent serves its API on
    ``port`` on every start, because the verifier keeps the address it was added with.
    """

    device_id: str
    directory: Path
    tpm_state_dir: Path
    files_dir: Path
    port: int
    fleet: Fleet
    swtpm: SwtpmProcess | None = None
    agent: EdgetrustProcess | None = None

    @property
    def state_dir(self) -> Path:
        """The agent's state directory: uuid, AK, TLS certificate, simulated IMA list."""
        return self.directory / "agent-state"

    @property
    def ima_list(self) -> Path:
        return self.state_dir / "ima" / "ascii_runtime_measurements"

    @property
    def tls_certificate(self) -> Path:
        """The agent's self-signed server certificate (PEM), which it registers as mtls_cert."""
        return self.state_dir / "tls" / "agent-cert.pem"

    @property
    def url(self) -> str:
        return f"{'https' if self.fleet.mtls else 'http'}://127.0.0.1:{self.port}"

    def file(self, name: str) -> Path:
        return self.files_dir / name

    def start_tpm(self) -> None:
        if self.swtpm is None:
            self.swtpm = SwtpmProcess(self.tpm_state_dir)
        self.swtpm.start()

    def reboot_tpm(self) -> None:
        """Restart swtpm on its state, as a reboot: resetCount grows and the PCRs start at 0."""
        assert self.swtpm is not None
        self.swtpm.restart()

    def agent_environment(self, registrar_url: str) -> dict[str, str]:
        assert self.swtpm is not None
        fleet = self.fleet
        values = {
            "EDGETRUST_DATA_DIR": str(self.directory / "data"),
            "EDGETRUST_LOG_LEVEL": "INFO",
            "EDGETRUST_AGENT_UUID": self.device_id,
            "EDGETRUST_AGENT_TCTI": self.swtpm.tcti,
            "EDGETRUST_AGENT_STATE_DIR": str(self.state_dir),
            "EDGETRUST_AGENT_REGISTRAR_URL": registrar_url,
            "EDGETRUST_AGENT_CONTACT_HOST": "127.0.0.1",
            "EDGETRUST_AGENT_CONTACT_PORT": str(self.port),
            "EDGETRUST_AGENT_RETRY_INITIAL": "0.5",
            "EDGETRUST_AGENT_RETRY_MAX": "2",
            "EDGETRUST_AGENT_ENABLE_MTLS": "true" if fleet.mtls else "false",
            # A path that never exists, so that the simulator runs even on a kernel with IMA.
            "EDGETRUST_AGENT_IMA_KERNEL_LIST": str(self.directory / "no-kernel-ima-list"),
            "EDGETRUST_AGENT_IMA_MEASURE_PATHS": str(self.files_dir),
            "EDGETRUST_AGENT_IMA_REMEASURE_INTERVAL": str(fleet.remeasure_interval),
        }
        if fleet.mtls:
            values["EDGETRUST_AGENT_CLIENT_CA"] = str(fleet.pki.ca_certificate)
        return clean_environment(values)

    def start_agent(self, registrar: ServerProcess | None = None) -> EdgetrustProcess:
        """Start swtpm if it is not running, then ``edgetrust agent``, which enrolls with
        ``registrar`` (default: the fleet's server) and serves the agent API until stopped."""
        if self.swtpm is None or not self.swtpm.running:
            self.start_tpm()
        environment = self.agent_environment((registrar or self.fleet.server_process()).url)
        if self.agent is None:
            self.agent = self.fleet.track(EdgetrustProcess(
                f"agent-{self.device_id}", ["agent"], environment,
                self.fleet.log_dir / f"agent-{self.device_id}.log"))
        else:
            # The TCTI port changes when swtpm restarts.
            self.agent.environment = environment
        return self.agent.start()

    def wait_serving(self) -> None:
        """Wait until the agent has enrolled and serves its API."""
        agent = self.agent
        assert agent is not None

        def serving() -> bool:
            if not agent.running:
                raise FleetError(f"{agent.name} exited with status {agent.returncode}; see "
                                 f"{agent.log_path}")
            return "serving the agent API" in agent.current_log()

        wait_until(serving, START_TIMEOUT, f"{agent.name} to serve its API")

    def stop_agent(self) -> int | None:
        return None if self.agent is None else self.agent.stop()

    def stop(self) -> None:
        self.stop_agent()
        if self.swtpm is not None:
            self.swtpm.stop()

    def requested_ima_entries(self, since: int = 0) -> list[int]:
        """Return the ``ima_ml_entry`` of each quote request in the agent's log (werkzeug's
        request lines), from character ``since`` of the log on."""
        text = "" if self.agent is None else self.agent.log_text()[since:]
        return [int(entry) for entry in _QUOTE_REQUEST.findall(text)]

    def ima_entries(self) -> list[str]:
        """Return the lines of the simulated IMA measurement list that the agent serves."""
        if not self.ima_list.exists():
            return []
        return self.ima_list.read_text(errors="replace").splitlines()


# --- The fleet --------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Every process of one test module or test, and the settings they share (see the module
    docstring). Times are in seconds."""

    workdir: Path
    database_url: str = ""
    """Empty: the embedded SQLite database in the server's data directory."""
    mtls: bool = True
    remeasure_interval: float = 0.5
    agent_timeout: float = 3.0
    lease_seconds: float = 30.0
    backoff_max: float = 8.0
    poller_threads: int = 4
    devices: list[Device] = field(default_factory=list)
    processes: list[EdgetrustProcess] = field(default_factory=list)
    server: ServerProcess | None = None
    token: str = ""
    api: ApiClient | None = None

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ca = LocalCa.create(self.workdir / "ek-localca")
        self.pki = ClientPki.create(self.workdir / "verifier-pki")

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "server-data"

    @property
    def ek_ca_dir(self) -> Path:
        return self.workdir / "ek-ca"

    def track(self, process: EdgetrustProcess) -> EdgetrustProcess:
        self.processes.append(process)
        return process

    # Devices.

    def provision_device(self, device_id: str, files: Mapping[str, bytes], *,
                         group: str = "fleet") -> Device:
        """Provision a swtpm state with EK certificates and write the device's files.

        The files go to ``<workdir>/files/<group>/<device_id>/``, which the device's IMA
        simulator measures; :meth:`upload_runtime_policy` makes one policy for a group.
        """
        directory = self.workdir / "devices" / device_id
        provisioned = provision_tpm_state(directory / "tpm", self.ca)
        files_dir = self.files_dir(group) / device_id
        files_dir.mkdir(parents=True)
        for name, content in files.items():
            (files_dir / name).write_bytes(content)
        device = Device(device_id, directory, provisioned.state_dir, files_dir, free_port(), self)
        self.devices.append(device)
        return device

    def write_ek_ca_bundle(self) -> None:
        """Write the local CA's certificates to ``ek_ca_dir``, which the registrar loads once
        on start. swtpm_localca creates the CA on its first provisioning, so a TPM state is
        provisioned for that if no device has been yet."""
        if not self.ca.root_certificate.exists():
            provision_tpm_state(self.workdir / "ca-bootstrap-tpm", self.ca)
        self.ca.write_bundle(self.ek_ca_dir)

    def files_dir(self, group: str) -> Path:
        return self.workdir / "files" / group

    def retire(self, device: Device) -> None:
        """Stop the device's agent and swtpm, and remove it from the verifier if it is there."""
        device.stop()
        if self.api is not None and self.server is not None and self.server.process.running:
            self.api.request("DELETE", f"/v1/devices/{device.device_id}", expected=204,
                             allowed=(404,))

    # Server and pollers.

    def verifier_settings(self) -> dict[str, str]:
        """Settings of every process that attests devices, as EDGETRUST_* variables."""
        values = {
            "EDGETRUST_DATA_DIR": str(self.data_dir),
            "EDGETRUST_LOG_LEVEL": "INFO",
            "EDGETRUST_EK_CA_DIR": str(self.ek_ca_dir),
            "EDGETRUST_VERIFIER_AGENT_MTLS": "true" if self.mtls else "false",
            "EDGETRUST_VERIFIER_AGENT_TIMEOUT": str(self.agent_timeout),
            "EDGETRUST_VERIFIER_LEASE_SECONDS": str(self.lease_seconds),
            "EDGETRUST_VERIFIER_BACKOFF_MAX": str(self.backoff_max),
            "EDGETRUST_VERIFIER_POLLER_THREADS": str(self.poller_threads),
        }
        if self.database_url:
            values["EDGETRUST_DATABASE_URL"] = self.database_url
        if self.mtls:
            values["EDGETRUST_VERIFIER_TLS_CERT"] = str(self.pki.client_certificate)
            values["EDGETRUST_VERIFIER_TLS_KEY"] = str(self.pki.client_key)
        return values

    def upgrade_database(self) -> None:
        """Run ``edgetrust db upgrade``; ``serve`` creates only a new SQLite database itself."""
        run_edgetrust(["db", "upgrade"], clean_environment(self.verifier_settings()))

    def start_server(self, name: str = "serve", *, primary: bool = True,
                     **settings: str) -> ServerProcess:
        """Start ``edgetrust serve``, wait for /healthz, and create the admin API token.

        ``settings`` are further settings by key (``verifier_poll_in_server="false"``). The
        poller id is ``name``. A server that is not ``primary`` (a second registrar with its
        own ``data_dir``, say) is neither the fleet's ``server`` nor called by ``api``.
        """
        self.write_ek_ca_bundle()
        runtime_dir = self.workdir / "run"
        runtime_dir.mkdir(mode=0o700, exist_ok=True)
        port = free_port()
        values = {
            **self.verifier_settings(),
            "EDGETRUST_LISTEN_HOST": "127.0.0.1",
            "EDGETRUST_LISTEN_PORT": str(port),
            "EDGETRUST_VERIFIER_POLLER_ID": name,
            # gunicorn puts its control socket here rather than in ~/.gunicorn, which every
            # gunicorn of this user shares.
            "XDG_RUNTIME_DIR": str(runtime_dir),
            **_variables(settings),
        }
        process = self.track(EdgetrustProcess(name, ["serve"], clean_environment(values),
                                              self.log_dir / f"{name}.log"))
        server = ServerProcess(process.start(), port)
        server.wait_healthy()
        if not primary:
            return server
        self.server = server
        if not self.token:
            self.token = run_edgetrust(
                ["token", "create", "--name", "integration-test", "--scope", "admin"],
                clean_environment(values)).stdout.strip()
        if self.api is None:
            self.api = ApiClient(server.url, self.token)
        return server

    def server_process(self) -> ServerProcess:
        if self.server is None:
            raise FleetError("start the server first")
        return self.server

    def start_poller(self, name: str, **settings: str) -> EdgetrustProcess:
        """Start ``edgetrust poll`` with the poller id ``name`` and further ``settings``."""
        values = {**self.verifier_settings(), "EDGETRUST_VERIFIER_POLLER_ID": name,
                  **_variables(settings)}
        return self.track(EdgetrustProcess(name, ["poll"], clean_environment(values),
                                           self.log_dir / f"{name}.log")).start()

    def client(self) -> ApiClient:
        if self.api is None:
            raise FleetError("start the server before calling its API")
        return self.api

    def upload_runtime_policy(self, group: str) -> Path:
        """Create a runtime policy from the files of the devices in ``group`` with ``edgetrust
        policy create runtime``, and return the policy file. ``edgetrust policy store upload``
        stores it as the policy named ``group``."""
        policy_file = self.workdir / f"runtime-policy-{group}.json"
        environment = clean_environment({})
        run_edgetrust(["policy", "create", "runtime", "--from-dir", str(self.files_dir(group)),
                       "-o", str(policy_file)], environment)
        run_edgetrust(["policy", "store", "upload", group, str(policy_file), "--kind", "runtime",
                       "--server", self.server_process().url, "--token", self.token],
                      environment)
        return policy_file

    # Logs and stopping.

    def log_marks(self) -> dict[Path, int]:
        """Return the size of every log now, for :meth:`print_logs`."""
        return {path: path.stat().st_size for path in self.log_dir.glob("*.log")}

    def print_logs(self, out: TextIO, since: Mapping[Path, int] | None = None) -> None:
        """Print the last lines that each log gained since ``since`` (default: the start)."""
        for path in sorted(self.log_dir.glob("*.log")):
            offset = (since or {}).get(path, 0)
            with path.open("rb") as stream:
                stream.seek(offset)
                text = stream.read().decode(errors="replace")
            lines = text.splitlines()[-LOG_TAIL_LINES:]
            if not lines:
                continue
            print(f"--- last {len(lines)} new lines of {path}", file=out)
            for line in lines:
                print(f"    {line}", file=out)

    def close(self) -> None:
        """Stop every process, newest first, and every swtpm."""
        for process in reversed(self.processes):
            process.stop()
        for device in self.devices:
            if device.swtpm is not None:
                device.swtpm.stop()
        if self.api is not None:
            self.api.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _variables(settings: Mapping[str, str]) -> dict[str, str]:
    return {f"EDGETRUST_{key.upper()}": value for key, value in settings.items()}
