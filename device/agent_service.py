"""The evidence service that ``edgetrust agent`` runs after enrollment: the evidence sources
and the agent API.

``AgentService.start`` brings them up in this order:

1. The UEFI event log: securityfs when it exists, else ``agent_event_log``. With
   ``agent_event_log_replay`` the log is first replayed into the PCRs (once after a TPM reset).
2. The IMA measurement list: the kernel's when it exists. Otherwise the IMA simulator measures
   ``agent_ima_measure_paths``; it runs after step 1 because its boot_aggregate covers PCR
   0-9. With neither, the agent serves no IMA list.
3. The quoter, with the payload key and the enrolled AK.
4. The agent API on the contact address: HTTPS that requires a client certificate from
   ``agent_client_ca``, or plain HTTP when ``agent_enable_mtls`` is false. In push mode
   (``push_url`` set) a thread pushes evidence to the verifier instead (``device.push``).
5. A thread that runs the IMA simulator again every ``agent_ima_remeasure_interval`` seconds.

``stop`` undoes them in reverse order.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from device.agent_server import (
    SUPPORTED_API_VERSIONS,
    AgentApiServer,
    AgentEvidence,
    create_agent_app,
    read_boot_time,
)
from device.attest import AgentQuoter, AttestationTpm, device_ak_loader
from device.bootlog_sim import (
    SECURITYFS_EVENT_LOG,
    event_log_path,
    load_event_log,
    replay_event_log_into_tpm,
)
from device.enroll import Backoff
from device.errors import AgentSettingsError
from device.ima_sim import SIMULATED_LIST_NAME, ImaSimulator, MeasurementListFile
from device.payload import load_or_create_payload_key
from device.push import PushClient, PushLoop
from device.tls import load_or_create_tls_identity, server_ssl_context
from device.tpm import AttestationKey, DeviceTpm, EndorsementKey
from edgetrust.logs import device_logger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentServiceConfig:
    """The agent settings that the evidence service uses; ``edgetrust agent`` builds it."""

    state_dir: Path
    host: str
    port: int
    enable_mtls: bool
    client_ca: Path | None
    ima_kernel_list: Path
    ima_measure_paths: tuple[Path, ...]
    ima_remeasure_interval: float
    event_log: Path | None
    event_log_replay: bool
    push_url: str = ""
    """Verifier base URL that push mode posts evidence to; empty serves the agent API instead."""
    retry_initial: float = 1.0
    retry_max: float = 60.0

    @property
    def simulated_ima_list(self) -> Path:
        return self.state_dir / "ima" / SIMULATED_LIST_NAME


def check_service_config(config: AgentServiceConfig) -> None:
    """Raise AgentSettingsError for the first setting the service cannot use, before any TPM
    or network work starts."""
    if config.enable_mtls and not config.push_url and config.client_ca is None:
        raise AgentSettingsError(
            "setting agent_client_ca is empty; set it to the PEM file of the CA that signs the "
            "verifier's client certificates, or set agent_enable_mtls to false to serve plain "
            "HTTP")
    if config.enable_mtls and config.client_ca is not None and not config.client_ca.is_file():
        raise AgentSettingsError(
            f"setting agent_client_ca is {str(config.client_ca)!r}, which is not a file")
    if config.ima_remeasure_interval < 0:
        raise AgentSettingsError(
            f"setting agent_ima_remeasure_interval is {config.ima_remeasure_interval}; expected "
            "0 (measure only on start) or a number of seconds")
    if config.event_log_replay and config.event_log is None:
        raise AgentSettingsError(
            "setting agent_event_log_replay is true but agent_event_log is empty; set it to the "
            "binary UEFI event log to replay")


class AgentService:
    """The evidence sources and the agent API of one enrolled agent (see the module docstring)."""

    def __init__(self, tpm: DeviceTpm, agent_id: str, ek: EndorsementKey, ak: AttestationKey,
                 config: AgentServiceConfig):
        self._device = tpm
        self.agent_id = agent_id
        self._ek = ek
        self._ak = ak
        self.config = config
        self._log = device_logger(log, agent_id)
        self._quoter: AgentQuoter | None = None
        self._server: AgentApiServer | None = None
        self._simulator: ImaSimulator | None = None
        self._remeasure_stop = threading.Event()
        self._remeasure_thread: threading.Thread | None = None
        self._push_stop = threading.Event()
        self._push_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the agent API is not started")
        return f"{self._server.scheme}://{self.config.host}:{self._server.port}"

    def start(self) -> None:
        """Start everything in the order of the module docstring; on failure, stop what
        started and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        tpm = AttestationTpm.for_device(self._device)

        # 1. UEFI event log.
        event_log = self._event_log(tpm)

        # 2. IMA measurement list.
        ima_list = self._ima_list(tpm)

        # 3. Quoter.
        payload_key = load_or_create_payload_key(self.config.state_dir)
        loader = device_ak_loader(self._device, self._ek, self._ak)
        self._quoter = AgentQuoter(tpm, self._ak.public, loader, payload_key)

        # 4. API server, or pushing.
        if self.config.push_url:
            self._start_pushing(ima_list, event_log)
            self._start_remeasuring()
            return
        evidence = AgentEvidence(agent_id=self.agent_id, quoter=self._quoter,
                                 ima_list=ima_list, event_log=event_log,
                                 boot_time=read_boot_time())
        self._server = AgentApiServer(create_agent_app(evidence), self.config.host,
                                      self.config.port, self._ssl_context())
        self._server.start()
        self._log.info("agent API (versions %s-%s) serving at %s", SUPPORTED_API_VERSIONS[0],
                       SUPPORTED_API_VERSIONS[-1], self.url)

        # 5. Re-measuring.
        self._start_remeasuring()

    def _start_pushing(self, ima_list: MeasurementListFile | None, event_log: bytes | None) -> None:
        assert self._quoter is not None
        client = PushClient(self.config.push_url, self.agent_id)
        loop = PushLoop(client, self.agent_id, self._quoter, ima_list, event_log,
                        Backoff(self.config.retry_initial, self.config.retry_max),
                        boot_time=read_boot_time())
        self._push_thread = threading.Thread(target=loop.run, args=(self._push_stop,), name="push",
                                             daemon=True)
        self._push_thread.start()

    def _event_log(self, tpm: AttestationTpm) -> bytes | None:
        path = event_log_path(self.config.event_log)
        if path is None:
            self._log.info("no UEFI event log: %s does not exist and agent_event_log is empty; "
                           "quotes with PCR 0 go without mb_measurement_list",
                           SECURITYFS_EVENT_LOG)
            return None
        raw_log = load_event_log(path)
        if self.config.event_log_replay:
            if path == SECURITYFS_EVENT_LOG:
                raise AgentSettingsError(
                    f"setting agent_event_log_replay is true, but firmware already measured the "
                    f"boot ({path} exists); replay is only for TPM simulators")
            outcome = replay_event_log_into_tpm(tpm, raw_log)
            self._log.info("UEFI event log %s: %s", path, outcome.value)
        self._log.info("serving the UEFI event log %s (%d bytes)", path, len(raw_log))
        return raw_log

    def _ima_list(self, tpm: AttestationTpm) -> MeasurementListFile | None:
        kernel_list = self.config.ima_kernel_list
        if kernel_list.exists():
            if self.config.ima_measure_paths:
                self._log.info("the kernel's IMA list %s exists, so the IMA simulator stays off",
                               kernel_list)
            self._log.info("serving the kernel's IMA measurement list %s", kernel_list)
            return MeasurementListFile(kernel_list)
        if not self.config.ima_measure_paths:
            self._log.info("no IMA measurement list: %s does not exist and "
                           "agent_ima_measure_paths is empty", kernel_list)
            return None

        simulator = ImaSimulator(tpm, self.config.simulated_ima_list, self.config.ima_measure_paths)
        simulator.start()
        self._simulator = simulator
        self._log.info("IMA simulator measuring %s into %s (%d entries)",
                       ", ".join(map(str, self.config.ima_measure_paths)),
                       self.config.simulated_ima_list, simulator.entry_count)
        return MeasurementListFile(self.config.simulated_ima_list)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.enable_mtls:
            self._log.warning("agent_enable_mtls is false: serving the agent API over plain HTTP "
                              "without client certificates; anyone who reaches %s:%d can ask "
                              "for quotes", self.config.host, self.config.port)
            return None
        identity = load_or_create_tls_identity(self.config.state_dir, self.agent_id,
                                               self.config.host)
        return server_ssl_context(identity, self.config.client_ca)

    def _start_remeasuring(self) -> None:
        simulator = self._simulator
        interval = self.config.ima_remeasure_interval
        if simulator is None or interval == 0:
            return
        self._remeasure_thread = threading.Thread(
            target=simulator.run, args=(self._remeasure_stop, interval), name="ima-simulator",
            daemon=True)
        self._remeasure_thread.start()

    def stop(self) -> None:
        """Stop re-measuring, pushing and the API server, and flush the AK; safe to call twice."""
        self._remeasure_stop.set()
        if self._remeasure_thread is not None:
            self._remeasure_thread.join(timeout=60)
            self._remeasure_thread = None
        self._push_stop.set()
        if self._push_thread is not None:
            self._push_thread.join(timeout=90)
            self._push_thread = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._quoter is not None:
            self._quoter.close()
            self._quoter = None
