"""The device agent's evidence side assembled for tests: swtpm, an AK, the quoter, the IMA
simulator and the agent API served on 127.0.0.1, plus TLS material and Keylime's own checks.

``AgentStack`` is what ``edgetrust agent`` runs after enrollment, without the registrar:

    with agent_stack(tpm.tcti, tmp_path / "state", measure=[car_dir]) as stack:
        body = stack.get("/v2.3/quotes/integrity", nonce="abc", mask="0x400", partial="0")

``KeylimeVerifier`` runs Keylime 7.14.3's verifier code (``process_quote_response``) in
Keylime's own virtual environment as a child process. It fetches quotes from the agent API
itself over HTTP(S), one round per call, and keeps Keylime's incremental IMA state between
rounds, as the Keylime verifier's polling loop does.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device.agent_server import AgentApiServer, AgentEvidence, create_agent_app
from device.attest import AgentQuoter, AttestationTpm, device_ak_loader
from device.ima_sim import TEMPLATE_HASH_ALGORITHM, ImaSimulator, MeasurementListFile
from device.payload import PayloadKey, load_or_create_payload_key
from device.tpm import AttestationKey, DeviceTpm, EndorsementKey
from evidence.ima import parse_ascii_list
from policies.generate import policy_from_measurement_list
from tests.conftest import REPO_ROOT

KEYLIME_PYTHON = REPO_ROOT / ".venv-keylime" / "bin" / "python"
QUIET_LOGGING = REPO_ROOT.parent / "shared" / "keylime-bench" / "keylime_logging_quiet.conf"
API = "/v2.3"
REQUEST_TIMEOUT = 30


@dataclass
class AgentKeys:
    """An EK and an AK created under it, kept across simulated agent restarts."""

    ek: EndorsementKey
    ak: AttestationKey


@dataclass
class AgentStack:
    device: DeviceTpm
    tpm: AttestationTpm
    keys: AgentKeys
    payload_key: PayloadKey
    quoter: AgentQuoter
    simulator: ImaSimulator | None
    server: AgentApiServer
    url: str
    session: requests.Session = field(default_factory=requests.Session)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """GET ``path`` and return the JSON body; fail the test unless the status is 200."""
        response = self.session.get(self.url + path, params=params, timeout=REQUEST_TIMEOUT)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def get_response(self, path: str, **params: str) -> requests.Response:
        return self.session.get(self.url + path, params=params, timeout=REQUEST_TIMEOUT)


def create_keys(device: DeviceTpm, *, ek_type: str = "ecc", ak_type: str = "ecc") -> AgentKeys:
    ek = device.read_endorsement_key(ek_type)
    return AgentKeys(ek, device.create_ak(ek, ak_type))


@contextmanager
def agent_stack(tcti: str, state_dir: Path, *, measure: Sequence[Path] = (),
                keys: AgentKeys | None = None, ak_type: str = "ecc", ima: bool = True,
                quoter_class: type[AgentQuoter] = AgentQuoter,
                event_log: bytes | None = None, ssl_context: Any = None,
                session: requests.Session | None = None) -> Iterator[AgentStack]:
    """Connect to the TPM, start the IMA simulator (unless ``ima`` is false) and serve the
    agent API on a free 127.0.0.1 port for the duration of the block."""
    device = DeviceTpm.connect(tcti)
    quoter: AgentQuoter | None = None
    server: AgentApiServer | None = None
    try:
        keys = keys or create_keys(device, ak_type=ak_type)
        tpm = AttestationTpm.for_device(device)
        payload_key = load_or_create_payload_key(state_dir)
        loader = device_ak_loader(device, keys.ek, keys.ak)
        quoter = quoter_class(tpm, keys.ak.public, loader, payload_key)

        simulator = None
        ima_list = None
        if ima:
            list_path = state_dir / "ima" / "ascii_runtime_measurements"
            simulator = ImaSimulator(tpm, list_path, measure)
            simulator.start()
            ima_list = MeasurementListFile(list_path)

        evidence = AgentEvidence(agent_id="test-agent", quoter=quoter, ima_list=ima_list,
                                 event_log=event_log, boot_time=1_700_000_000)
        server = AgentApiServer(create_agent_app(evidence), "127.0.0.1", 0, ssl_context)
        server.start()
        yield AgentStack(device, tpm, keys, payload_key, quoter, simulator, server,
                         f"{server.scheme}://127.0.0.1:{server.port}",
                         session or requests.Session())
    finally:
        if server is not None:
            server.stop()
        if quoter is not None:
            quoter.close()
        device.close()


def runtime_policy(stack: AgentStack, extra_contents: dict[Path, list[bytes]] | None = None
                   ) -> dict[str, Any]:
    """A Keylime runtime policy allowing everything in the agent's list so far, plus
    ``extra_contents`` (the file contents a test writes later)."""
    assert stack.simulator is not None
    text = stack.simulator.list_path.read_text()
    entries = parse_ascii_list(text, template_hash_algorithm=TEMPLATE_HASH_ALGORITHM)
    document = policy_from_measurement_list(entries).document
    for path, contents in (extra_contents or {}).items():
        digests = document["digests"].setdefault(str(path.resolve()), [])
        digests += [hashlib.sha256(content).hexdigest() for content in contents]
    return document


# --- TLS material --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCa:
    """A CA for verifier client certificates, and one client certificate it issued."""

    ca_file: Path
    client_certificate: Path
    client_key: Path


def make_client_ca(directory: Path, name: str = "verifier client CA") -> ClientCa:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "verifier")]))
              .issuer_name(ca_name).public_key(client_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
              .sign(ca_key, hashes.SHA256()))
    paths = ClientCa(directory / "ca.pem", directory / "client.pem", directory / "client-key.pem")
    paths.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.client_certificate.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    paths.client_key.write_bytes(client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


# --- Keylime's verifier code ------------------------------------------------------------------

# Runs in Keylime's venv. Reads one JSON request per line on stdin and writes one JSON line
# per request.
#   {"op": "init", "agent_url", "api", "ak_tpm", "mask", "runtime_policy", "verify", "cert"}
#   {"op": "round"}: one poll: GET integrity quote, then process_quote_response.
_VERIFIER_SCRIPT = r'''
import ast, json, sys
import requests
from keylime import cloud_verifier_common
from keylime.agentstates import AgentAttestState
from keylime.mba import mba
from keylime.tpm import tpm_util

mba.load_imports(skip_custom_policies=True)
state = None
agent = None
config = None
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "init":
        config = request
        state = AgentAttestState("edgetrust-test-agent")
        agent = {
            "agent_id": "edgetrust-test-agent", "public_key": "", "b64_encrypted_V": "",
            "accept_tpm_hash_algs": ["sha512", "sha384", "sha256", "sha1"],
            "accept_tpm_encryption_algs": ["ecc", "rsa"],
            "accept_tpm_signing_algs": ["ecschnorr", "rsassa", "ecdsa"],
            "ima_sign_verification_keys": "", "tpm_clockinfo": None,
            "ak_tpm": request["ak_tpm"], "tpm_policy": json.dumps({"mask": request["mask"]}),
            "supported_version": "2.3", "attestation_count": 0,
        }
        print(json.dumps({"ok": True}), flush=True)
        continue
    agent["nonce"] = tpm_util.random_password(20)
    params = {"nonce": agent["nonce"], "mask": config["mask"],
              "partial": "0" if agent["public_key"] == "" else "1",
              "ima_ml_entry": state.get_next_ima_ml_entry()}
    response = requests.get(config["agent_url"] + config["api"] + "/quotes/integrity",
                            params=params, verify=config["verify"],
                            cert=tuple(config["cert"]) if config["cert"] else None,
                            timeout=60)
    results = response.json()["results"]
    failure = cloud_verifier_common.process_quote_response(
        agent, None, config["runtime_policy"], results, state)
    events = [event.event_id for event in failure.events]
    mb_mismatch = []
    mb_compared = []
    if results.get("mb_measurement_list"):
        quoted = cloud_verifier_common.get_tpm_instance().get_pcrs_from_quote(results["quote"], False)
        replayed, _, _, mb_failure = mba.bootlog_parse(results["mb_measurement_list"], results["hash_alg"])
        events += [event.event_id for event in mb_failure.events]
        for pcr, value in replayed.items():
            if int(pcr) not in quoted:
                continue
            mb_compared.append(int(pcr))
            if int(quoted[int(pcr)], 16) != value:
                mb_mismatch.append(int(pcr))
    print(json.dumps({
        "status": response.status_code, "events": events, "mb_mismatch": mb_mismatch,
        "mb_compared": sorted(mb_compared),
        "requested_entry": params["ima_ml_entry"],
        "entry": results.get("ima_measurement_list_entry"),
        "lines": len((results.get("ima_measurement_list") or "").splitlines()),
        "next_entry": state.get_next_ima_ml_entry(),
        "partial": params["partial"],
    }), flush=True)
'''


def keylime_environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    environment["KEYLIME_LOGGING_CONFIG"] = str(QUIET_LOGGING)
    return environment


def require_keylime() -> None:
    if not KEYLIME_PYTHON.exists():
        pytest.skip(f"Keylime's venv is missing at {KEYLIME_PYTHON}; build it with "
                    "scripts/setup-keylime.sh")


class KeylimeVerifier:
    """Keylime's verifier code polling one agent; see the module docstring."""

    def __init__(self, *, agent_url: str, ak_tpm: bytes, mask: str,
                 runtime_policy: dict[str, Any] | None, verify: str | bool = False,
                 cert: tuple[str, str] | None = None):
        require_keylime()
        self._process = subprocess.Popen(
            [str(KEYLIME_PYTHON), "-c", _VERIFIER_SCRIPT], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=keylime_environment())
        self._stderr: list[str] = []
        self._stderr_reader = threading.Thread(target=self._collect_stderr, daemon=True)
        self._stderr_reader.start()
        self._call({"op": "init", "agent_url": agent_url, "api": API,
                    "ak_tpm": base64.b64encode(ak_tpm).decode(), "mask": mask,
                    "runtime_policy": runtime_policy, "verify": verify,
                    "cert": list(cert) if cert else None})

    def _collect_stderr(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._stderr.append(line)

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(timeout=30)
            raise AssertionError("Keylime verifier process exited: " + "".join(self._stderr)[-4000:])
        result: dict[str, Any] = json.loads(line)
        return result

    def poll(self) -> dict[str, Any]:
        """Run one attestation round; return status, failure event ids and IMA positions."""
        return self._call({"op": "round"})

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=30)
        if self._process.stdout is not None:
            self._process.stdout.close()
