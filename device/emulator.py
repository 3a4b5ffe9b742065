"""An emulated device TPM: swtpm provisioned with EK certificates from a local CA.

The demo and the tests use it on machines without a hardware TPM. Two parts:

- :class:`LocalCa` and :func:`provision_tpm_state` run ``swtpm_setup`` with ``swtpm_localca``
  to create a TPM 2.0 state whose RSA-2048 and ECC P-384 EKs carry certificates in TPM NV
  memory, as a vendor-provisioned TPM does. The CA gets its own configuration files in a
  directory of the caller's choosing, so nothing is written to the Debian default CA location
  (/var/lib/swtpm-localca). The first provisioning creates the CA (a root and an intermediate),
  which makes it the slowest; later ones reuse it.
- :class:`SwtpmProcess` runs ``swtpm socket --tpm2`` on that state as a foreground child on a
  free 127.0.0.1 port pair (control port = server port + 1, which the ``swtpm:`` TCTI assumes)
  and stops it again. Each start with ``startup-clear`` increments the TPM's resetCount, like a
  reboot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SWTPM_SETUP_TIMEOUT_SECONDS = 120
STARTUP_TIMEOUT_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 5.0
START_ATTEMPTS = 5
REQUIRED_TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca")

TPM_ST_NO_SESSIONS = 0x8001
TPM_CC_SHUTDOWN = 0x00000145
TPM_SU_CLEAR = 0x0000


class EmulatorError(Exception):
    """swtpm or swtpm_setup is missing or failed; the message has its output."""

    code = "tpm-emulator-failed"


def missing_tools() -> list[str]:
    """Return the swtpm binaries this module needs that are not on PATH."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


@dataclass(frozen=True)
class LocalCa:
    """A swtpm_localca CA kept in ``directory``, with the configuration swtpm_setup reads."""

    directory: Path

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def setup_config(self) -> Path:
        return self.directory / "swtpm_setup.conf"

    @property
    def root_certificate(self) -> Path:
        """PEM of the self-signed root. It exists after the first provisioning."""
        return self.state_dir / "swtpm-localca-rootca-cert.pem"

    @property
    def intermediate_certificate(self) -> Path:
        """PEM of the intermediate that signs EK certificates. It exists after the first run."""
        return self.state_dir / "issuercert.pem"

    @classmethod
    def create(cls, directory: Path, manufacturer: str = "edgetrust-test") -> LocalCa:
        """Write the swtpm_setup and swtpm_localca configuration files into ``directory``."""
        ca = cls(directory.resolve())
        ca.state_dir.mkdir(parents=True, exist_ok=True)
        localca_config = ca.directory / "swtpm-localca.conf"
        localca_options = ca.directory / "swtpm-localca.options"
        ca.setup_config.write_text(
            f"create_certs_tool = {shutil.which('swtpm_localca') or '/usr/bin/swtpm_localca'}\n"
            f"create_certs_tool_config = {localca_config}\n"
            f"create_certs_tool_options = {localca_options}\n"
            "active_pcr_banks = sha1,sha256\n"
        )
        localca_config.write_text(
            f"statedir = {ca.state_dir}\n"
            f"signingkey = {ca.state_dir / 'signkey.pem'}\n"
            f"issuercert = {ca.intermediate_certificate}\n"
            f"certserial = {ca.state_dir / 'certserial'}\n"
        )
        localca_options.write_text(
            f"--platform-manufacturer {manufacturer}\n--platform-version 2.1\n--platform-model swtpm\n"
        )
        return ca

    def write_bundle(self, directory: Path) -> Path:
        """Copy the root and intermediate PEM files into ``directory``, a CA bundle."""
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.root_certificate, directory / "swtpm-localca-root.pem")
        shutil.copy(self.intermediate_certificate, directory / "swtpm-localca-intermediate.pem")
        return directory


@dataclass(frozen=True)
class ProvisionedTpm:
    """A swtpm state directory with EKs and their certificates in NV, and copies as files."""

    state_dir: Path
    ek_rsa2048_certificate: Path  # DER, also in NV index 0x01c00002
    ek_ecc_p384_certificate: Path  # DER, also in NV index 0x01c00016
    root_certificate: Path  # PEM
    intermediate_certificate: Path  # PEM


def provision_tpm_state(directory: Path, ca: LocalCa) -> ProvisionedTpm:
    """Run swtpm_setup to create a TPM 2.0 state with RSA-2048 and ECC P-384 EK certificates.

    ``directory`` receives ``state/`` (the swtpm state), ``ekcerts/`` (the certificates as DER
    files) and ``tmp/`` (swtpm_setup's scratch files). Raises EmulatorError with swtpm_setup's
    output if it fails.
    """
    missing = missing_tools()
    if missing:
        raise EmulatorError(
            f"missing {', '.join(missing)}; install the Debian packages swtpm and swtpm-tools"
        )
    directory = directory.resolve()
    state_dir = directory / "state"
    certificates_dir = directory / "ekcerts"
    scratch_dir = directory / "tmp"
    for path in (state_dir, certificates_dir, scratch_dir):
        path.mkdir(parents=True, exist_ok=True)

    command = [
        "swtpm_setup", "--tpm2", "--tpmstate", str(state_dir), "--config", str(ca.setup_config),
        "--create-ek-cert", "--lock-nvram", "--pcr-banks", "sha1,sha256",
        "--write-ek-cert-files", str(certificates_dir), "--overwrite",
    ]
    # swtpm_setup writes scratch certificates under TMPDIR, so keep them in our directory.
    environment = {**os.environ, "TMPDIR": str(scratch_dir)}
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment,
        timeout=SWTPM_SETUP_TIMEOUT_SECONDS, check=False,
    )
    if result.returncode != 0:
        raise EmulatorError(
            f"swtpm_setup failed with exit status {result.returncode}:\n{result.stdout}{result.stderr}"
        )

    provisioned = ProvisionedTpm(
        state_dir=state_dir,
        ek_rsa2048_certificate=certificates_dir / "ek-rsa2048.crt",
        ek_ecc_p384_certificate=certificates_dir / "ek-secp384r1.crt",
        root_certificate=ca.root_certificate,
        intermediate_certificate=ca.intermediate_certificate,
    )
    for path in (
        provisioned.ek_rsa2048_certificate,
        provisioned.ek_ecc_p384_certificate,
        provisioned.root_certificate,
        provisioned.intermediate_certificate,
    ):
        if not path.is_file():
            raise EmulatorError(f"swtpm_setup succeeded but did not write {path}:\n{result.stdout}")
    return provisioned


def free_port_pair() -> int:
    """Return a port P such that P and P + 1 were both free on 127.0.0.1 a moment ago."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise EmulatorError("no free pair of adjacent TCP ports on 127.0.0.1")


class SwtpmProcess:
    """A ``swtpm socket --tpm2`` child process bound to 127.0.0.1."""

    def __init__(self, state_dir: Path | str, *, binary: str | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def tcti(self) -> str:
        """TCTI configuration string for tpm2-pytss and tpm2-tools (``TPM2TOOLS_TCTI``)."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> SwtpmProcess:
        """Start swtpm and wait until its server port accepts; retry on a port race."""
        binary = self._binary or shutil.which("swtpm")
        if binary is None:
            raise EmulatorError("swtpm is not installed; install the Debian package swtpm")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(START_ATTEMPTS):
            self.port = free_port_pair()
            self._process = subprocess.Popen(
                [
                    binary, "socket", "--tpm2",
                    "--tpmstate", f"dir={self.state_dir}",
                    "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                    "--ctrl", f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_until_accepting():
                return self
            last_error = self._collect_failure()
        raise EmulatorError(f"swtpm did not start after {START_ATTEMPTS} attempts: {last_error}")

    def _wait_until_accepting(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ):
                return True
            time.sleep(0.005)
        return False

    def _collect_failure(self) -> str:
        assert self._process is not None
        if self._process.poll() is None:
            self._process.kill()
        _, stderr = self._process.communicate(timeout=STOP_TIMEOUT_SECONDS)
        self._process = None
        return stderr.decode(errors="replace").strip() or "no output"

    def stop(self, *, orderly: bool = True) -> None:
        """Shut the TPM down (orderly unless ``orderly`` is False), then terminate swtpm and wait.

        Without TPM2_Shutdown the next start counts as an unorderly shutdown: quotes report
        clockInfo.safe = NO, and after a few of those the TPM's dictionary-attack protection
        locks out the EK's authorization. ``orderly=False`` simulates a power loss.
        """
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            if orderly:
                self._send_shutdown()
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_SECONDS)
        if process.stderr is not None:
            process.stderr.close()

    def _send_shutdown(self) -> None:
        """Send TPM2_Shutdown(TPM_SU_CLEAR) on the command port; best effort."""
        command = struct.pack(">HIIH", TPM_ST_NO_SESSIONS, 12, TPM_CC_SHUTDOWN, TPM_SU_CLEAR)
        with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", self.port), timeout=2.0
        ) as connection:
            connection.sendall(command)
            connection.recv(64)

    def restart(self, *, orderly: bool = True) -> None:
        """Stop and start swtpm on the same state, as a device reboot (resetCount grows)."""
        self.stop(orderly=orderly)
        self.start()

    def __enter__(self) -> SwtpmProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
