"""Provision swtpm state directories with EK certificates made by swtpm_setup and swtpm_localca.

swtpm_localca gets its own configuration files in a directory of the caller's choosing, so
nothing is written to the Debian default CA location (/var/lib/swtpm-localca). The first
provisioning also creates the CA (a root and an intermediate with RSA-3072 keys), which makes
it the slowest, so tests share one ``LocalCa`` per session.

swtpm_setup starts its own swtpm on a unix socket and stops it before returning. Starting swtpm
on the provisioned state directory is left to the caller.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SWTPM_SETUP_TIMEOUT_SECONDS = 120
REQUIRED_TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca")


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
    def create(cls, directory: Path) -> LocalCa:
        """Write the swtpm_setup and swtpm_localca configuration files into ``directory``."""
        ca = cls(directory)
        ca.state_dir.mkdir(parents=True, exist_ok=True)
        localca_config = directory / "swtpm-localca.conf"
        localca_options = directory / "swtpm-localca.options"
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
            "--platform-manufacturer edgetrust-test\n--platform-version 2.1\n--platform-model swtpm\n"
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
    files) and ``tmp/`` (swtpm_setup's scratch files). Raises ``RuntimeError`` with
    swtpm_setup's output if it fails.
    """
    state_dir = directory / "state"
    certificates_dir = directory / "ekcerts"
    scratch_dir = directory / "tmp"
    for path in (state_dir, certificates_dir, scratch_dir):
        path.mkdir(parents=True, exist_ok=True)

    command = [
        "swtpm_setup",
        "--tpm2",
        "--tpmstate",
        str(state_dir),
        "--config",
        str(ca.setup_config),
        "--create-ek-cert",
        "--lock-nvram",
        "--pcr-banks",
        "sha1,sha256",
        "--write-ek-cert-files",
        str(certificates_dir),
        "--overwrite",
    ]
    # swtpm_setup writes scratch certificates under TMPDIR, so point TMPDIR into the test directory.
    environment = {**os.environ, "TMPDIR": str(scratch_dir)}
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=environment,
        timeout=SWTPM_SETUP_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
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
            raise RuntimeError(f"swtpm_setup succeeded but did not write {path}:\n{result.stdout}")
    return provisioned
