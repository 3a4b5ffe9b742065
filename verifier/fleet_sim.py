"""A software fleet: many Keylime agent API endpoints in one process, for tests and benchmarks.

Each ``SimulatedDevice`` simulates a device with a TPM and IMA. ``SoftwareTpm`` holds an
EK and an AK as software ECDSA P-256 keys, PCR banks and the clockInfo counters, and signs
quotes (TPMS_ATTEST and TPMT_SIGNATURE built here as a TPM builds them). The simulated kernel
logs an ima-ng entry for each file it measures and extends PCR 10 with it. ``Fleet`` serves
``GET /v2.x/quotes/integrity`` for every device on its own port of 127.0.0.1, over HTTP or
over mutual TLS with a self-signed server certificate per device, as a Keylime agent does.

NOTE: the keys never sit in a TPM, so these quotes prove nothing about real hardware; they
exercise the verifier's protocol, parsing, verification and storage paths only.

Run a fleet in its own process for the benchmark::

    python -m verifier.fleet_sim --devices 1000 --manifest fleet.json [--tls DIR]

It writes the manifest (device ids, ports, AKs, EKs, certificates) once every port listens,
and serves until it receives SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import functools
import hashlib
import json
import os
import secrets
import signal
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from evidence.eventlog import parse_event_log, replay_event_log
from evidence.ima import compute_boot_aggregate
from evidence.tpm import (
    TPM_GENERATED_VALUE,
    ObjectAttributes,
    PcrBank,
    PcrSelection,
    PublicArea,
    StructureTag,
    TpmAlg,
    ak_qualified_name,
    format_keylime_quote,
    marshal_pcr_file,
    parse_tpm2b_public,
)

_BANK_ALGS: Final = {"sha1": TpmAlg.SHA1, "sha256": TpmAlg.SHA256, "sha384": TpmAlg.SHA384,
                     "sha512": TpmAlg.SHA512}
_AK_ATTRIBUTES: Final = (
    ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT
    | ObjectAttributes.SENSITIVE_DATA_ORIGIN | ObjectAttributes.USER_WITH_AUTH
    | ObjectAttributes.RESTRICTED | ObjectAttributes.SIGN_ENCRYPT
)
_EK_ATTRIBUTES: Final = (
    ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT
    | ObjectAttributes.SENSITIVE_DATA_ORIGIN | ObjectAttributes.ADMIN_WITH_POLICY
    | ObjectAttributes.RESTRICTED | ObjectAttributes.DECRYPT
)
# authPolicy of the TCG EK templates L-1 and L-2 (PolicyA, SHA-256).
_EK_POLICY_A: Final = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
_NIST_P256: Final = 0x0003
# PCR 16, which the Keylime agent adds to every quote, and PCR 10, which IMA extends.
_AGENT_PCR: Final = 16
_IMA_PCR: Final = 10
_API_VERSIONS: Final = ("2.1", "2.2", "2.3", "2.4", "2.5")


# --- The TPM ----------------------------------------------------------------------------------


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _tpm2b(data: bytes) -> bytes:
    return _u16(len(data)) + data


def ecc_tpm2b_public(key: ec.EllipticCurvePublicKey, *, signing: bool) -> bytes:
    """Marshal the TPM2B_PUBLIC of a P-256 AK (ECDSA-SHA256) or storage EK (AES-128-CFB)."""
    numbers = key.public_numbers()
    if signing:
        head = _u16(TpmAlg.ECC) + _u16(TpmAlg.SHA256) + int(_AK_ATTRIBUTES).to_bytes(4, "big") + _tpm2b(b"")
        parameters = _u16(TpmAlg.NULL) + _u16(TpmAlg.ECDSA) + _u16(TpmAlg.SHA256)
    else:
        head = (_u16(TpmAlg.ECC) + _u16(TpmAlg.SHA256) + int(_EK_ATTRIBUTES).to_bytes(4, "big")
                + _tpm2b(_EK_POLICY_A))
        parameters = _u16(TpmAlg.AES) + _u16(128) + _u16(TpmAlg.CFB) + _u16(TpmAlg.NULL)
    unique = _tpm2b(numbers.x.to_bytes(32, "big")) + _tpm2b(numbers.y.to_bytes(32, "big"))
    return _tpm2b(head + parameters + _u16(_NIST_P256) + _u16(TpmAlg.NULL) + unique)


class SoftwareTpm:
    """A TPM reduced to what quoting needs: PCR banks, clockInfo, an EK and an AK in software."""

    def __init__(self, banks: Sequence[str] = ("sha256",), *, reset_count: int = 0) -> None:
        self.banks = tuple(banks)
        self.ek_key = ec.generate_private_key(ec.SECP256R1())
        self.ak_key = ec.generate_private_key(ec.SECP256R1())
        self.ek_tpm = ecc_tpm2b_public(self.ek_key.public_key(), signing=False)
        self.ak_tpm = ecc_tpm2b_public(self.ak_key.public_key(), signing=True)
        self.ak_public: PublicArea = parse_tpm2b_public(self.ak_tpm)
        self.ek_public: PublicArea = parse_tpm2b_public(self.ek_tpm)
        self.qualified_name = ak_qualified_name(self.ek_public, self.ak_public)
        self.reset_count = reset_count
        self.restart_count = 0
        self._clock_base = 1_000_000
        self._started = time.monotonic()
        self._last_clock = 0
        self._lock = threading.Lock()
        self.pcrs: dict[str, list[bytes]] = {}
        self._reset_pcrs()

    def _reset_pcrs(self) -> None:
        self.pcrs = {bank: [bytes(hashlib.new(bank).digest_size)] * 24 for bank in self.banks}

    def extend(self, pcr: int, data: bytes) -> None:
        """Extend ``pcr`` in every bank with the bank's hash of ``data``, as a measurement does."""
        with self._lock:
            for bank, values in self.pcrs.items():
                digest = hashlib.new(bank, data).digest()
                values[pcr] = hashlib.new(bank, values[pcr] + digest).digest()

    def extend_digests(self, pcr: int, digests: Mapping[str, bytes]) -> None:
        """Extend ``pcr`` of each bank with the digest given for it."""
        with self._lock:
            for bank, values in self.pcrs.items():
                values[pcr] = hashlib.new(bank, values[pcr] + digests[bank]).digest()

    def reset(self) -> None:
        """Reboot: PCRs back to zero, resetCount + 1, restartCount back to 0."""
        with self._lock:
            self._reset_pcrs()
            self.reset_count += 1
            self.restart_count = 0

    def replace_ak(self) -> None:
        """Make a new AK, as an agent without persistent storage does when it restarts."""
        self.ak_key = ec.generate_private_key(ec.SECP256R1())
        self.ak_tpm = ecc_tpm2b_public(self.ak_key.public_key(), signing=True)
        self.ak_public = parse_tpm2b_public(self.ak_tpm)
        self.qualified_name = ak_qualified_name(self.ek_public, self.ak_public)

    def set_pcrs(self, values: Mapping[str, Mapping[int, bytes]]) -> None:
        """Set PCR values directly, as firmware leaves them (a software TPM may skip extends)."""
        with self._lock:
            for bank, pcrs in values.items():
                if bank in self.pcrs:
                    for index, value in pcrs.items():
                        self.pcrs[bank][index] = value

    def read(self, bank: str, pcrs: Iterable[int]) -> dict[int, bytes]:
        with self._lock:
            return {index: self.pcrs[bank][index] for index in pcrs}

    def _next_clock(self) -> int:
        clock = self._clock_base + int((time.monotonic() - self._started) * 1000)
        self._last_clock = max(clock, self._last_clock + 1)
        return self._last_clock

    def quote(self, nonce: bytes, pcrs: Iterable[int], bank: str = "sha256") -> tuple[bytes, bytes, bytes]:
        """Quote ``pcrs`` of ``bank`` over ``nonce``; return TPMS_ATTEST, TPMT_SIGNATURE and
        the PCR file."""
        indexes = tuple(sorted(set(pcrs)))
        selection = PcrSelection((PcrBank(_BANK_ALGS[bank], indexes),))
        with self._lock:
            values = {index: self.pcrs[bank][index] for index in indexes}
            clock = self._next_clock()
            counters = struct.pack(">QIIBQ", clock, self.reset_count, self.restart_count, 1, 0x2023_0001)
        pcr_digest = hashlib.sha256(b"".join(values[index] for index in indexes)).digest()
        attest = (
            struct.pack(">IH", TPM_GENERATED_VALUE, StructureTag.ATTEST_QUOTE)
            + _tpm2b(self.qualified_name)
            + _tpm2b(nonce)
            + counters
            + selection.marshal()
            + _tpm2b(pcr_digest)
        )
        signature = self.sign(attest)
        pcr_file = marshal_pcr_file(selection, {_BANK_ALGS[bank]: values})
        return attest, signature, pcr_file

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the AK; return the TPMT_SIGNATURE (ECDSA, SHA-256)."""
        der = self.ak_key.sign(message, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return (_u16(TpmAlg.ECDSA) + _u16(TpmAlg.SHA256)
                + _tpm2b(r.to_bytes(32, "big")) + _tpm2b(s.to_bytes(32, "big")))


# --- IMA ----------------------------------------------------------------------------------


def ima_ng_line(path: str, digest: bytes, algorithm: str = "sha256") -> tuple[str, bytes]:
    """Return the ASCII line of an ima-ng entry (template hash SHA-1) and its template data."""
    name = path.encode("utf-8")
    d_ng = algorithm.encode("ascii") + b":\0" + digest
    n_ng = name + b"\0"
    template_data = struct.pack("<I", len(d_ng)) + d_ng + struct.pack("<I", len(n_ng)) + n_ng
    template_hash = hashlib.sha1(template_data).hexdigest()  # noqa: S324 - IMA's template hash column
    return f"10 {template_hash} ima-ng {algorithm}:{digest.hex()} {path}", template_data


# PCR 0-7 values of the simulated firmware; the boot_aggregate covers them with PCR 8 and 9.
_FIRMWARE_MEASUREMENTS: Final = tuple(f"firmware component {index}".encode() for index in range(10))


@dataclass
class SimulatedDevice:
    """A device: its software TPM, its IMA measurement list and the files it runs.

    ``files`` maps a path to the SHA-256 of its content; ``boot`` measures each of them once.
    ``entries_per_quote`` files from ``files`` are measured again before each quote, and
    ``entries_after_quote`` after the quote but before the list is read, which is how a real
    list gets ahead of the quote. With ``event_log`` (a binary UEFI event log) the PCRs of
    each boot are that log's replay, and quotes that cover PCR 0 carry the log.
    """

    device_id: str
    files: dict[str, bytes] = field(default_factory=dict)
    bank: str = "sha256"
    entries_per_quote: int = 0
    entries_after_quote: int = 0
    reachable: bool = True
    answer_delay: float = 0.0
    """Seconds to wait before responding to a request, to simulate a slow or hanging agent."""
    freeze_pcr10: bool = False
    """Stop extending PCR 10 while the list keeps growing (an attack the progress check finds)."""
    event_log: bytes | None = None
    port: int = 0
    tpm: SoftwareTpm = field(init=False)
    ima_lines: list[str] = field(init=False, default_factory=list)
    quotes_served: int = 0
    last_request: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tpm = SoftwareTpm((self.bank,))
        self._lock = threading.Lock()
        self._next_file = 0
        self.boot()

    def boot(self) -> None:
        """Measure firmware into PCR 0-9, log the boot_aggregate, then measure every file."""
        with self._lock:
            self.ima_lines = []
        if self.event_log is not None:
            self.tpm.set_pcrs(replay_event_log(parse_event_log(self.event_log)))
        else:
            for index, measurement in enumerate(_FIRMWARE_MEASUREMENTS):
                self.tpm.extend(index, measurement)
        aggregate = compute_boot_aggregate("sha256", self.tpm.read("sha256", range(10))) \
            if "sha256" in self.tpm.banks else bytes(32)
        self._log("boot_aggregate", aggregate)
        for path, digest in list(self.files.items()):
            self._log(path, digest)

    def reboot(self) -> None:
        self.tpm.reset()
        self.boot()

    def measure(self, path: str, digest: bytes | None = None) -> None:
        """Log ``path`` with ``digest`` (default: its digest in ``files``) and extend PCR 10."""
        self._log(path, self.files[path] if digest is None else digest)

    def _log(self, path: str, digest: bytes) -> None:
        line, template_data = ima_ng_line(path, digest)
        with self._lock:
            self.ima_lines.append(line)
            if not self.freeze_pcr10:
                self.tpm.extend(_IMA_PCR, template_data)

    def _measure_some(self, count: int) -> None:
        paths = list(self.files)
        for _ in range(count if paths else 0):
            self.measure(paths[self._next_file % len(paths)])
            self._next_file += 1

    def ima_list_from(self, requested: int) -> tuple[int, str]:
        """Return the list from entry ``requested``, or from 0 if the list is shorter (a reboot)."""
        with self._lock:
            start = requested if requested <= len(self.ima_lines) else 0
            return start, "".join(line + "\n" for line in self.ima_lines[start:])

    def answer_quote(self, query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """Respond to ``GET /v2.x/quotes/integrity`` as a Keylime agent; return status and body."""
        self.last_request = dict(query)
        self.requests.append(dict(query))
        try:
            nonce = query["nonce"]
            mask = int(query["mask"], 16)
            ima_offset = int(query.get("ima_ml_entry", "0"))
        except (KeyError, ValueError):
            return 400, {"code": 400, "status": "invalid quote request", "results": {}}
        if not nonce.isalnum() or len(nonce) > 64:
            return 400, {"code": 400, "status": "nonce must be alphanumeric", "results": {}}

        self._measure_some(self.entries_per_quote)
        pcrs = {index for index in range(24) if mask >> index & 1} | {_AGENT_PCR}
        attest, signature, pcr_file = self.tpm.quote(nonce.encode("ascii"), pcrs, self.bank)
        self._measure_some(self.entries_after_quote)
        start, text = self.ima_list_from(ima_offset)
        self.quotes_served += 1
        results = {
            "quote": format_keylime_quote(attest, signature, pcr_file),
            "hash_alg": self.bank,
            "enc_alg": "ecc",
            "sign_alg": "ecdsa",
            "ima_measurement_list": text,
            "ima_measurement_list_entry": start,
        }
        if self.event_log is not None and 0 in pcrs:
            results["mb_measurement_list"] = base64.b64encode(self.event_log).decode("ascii")
        return 200, {"code": 200, "status": "Success", "results": results}


def make_files(count: int, prefix: str = "/usr/bin/tool") -> dict[str, bytes]:
    """Return ``count`` file paths with random SHA-256 content digests."""
    return {f"{prefix}{index}": secrets.token_bytes(32) for index in range(count)}


def runtime_policy_document(files: Mapping[str, bytes], *, extra_digests: int = 0) -> dict[str, Any]:
    """Return a Keylime runtime policy allowing ``files``, plus random paths to reach a size.

    The boot_aggregate is not listed: the verifier recomputes it from the quoted PCRs.
    """
    digests = {path: [digest.hex()] for path, digest in files.items()}
    for index in range(extra_digests):
        digests[f"/usr/lib/generated/file{index}"] = [secrets.token_hex(32)]
    return {
        "meta": {"version": 1, "generator": 0},
        "release": 0,
        "digests": digests,
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }


# --- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def self_signed_identity(common_name: str, *, ca: bool = False,
                         issuer: tuple[TlsIdentity, ec.EllipticCurvePrivateKey] | None = None) -> TlsIdentity:
    """Make an ECDSA P-256 certificate for ``common_name``, self-signed or issued by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    issuer_name, signing_key = name, key
    if issuer is not None:
        issuer_name = x509.load_pem_x509_certificate(issuer[0].cert_pem).subject
        signing_key = issuer[1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
    )
    cert = builder.sign(signing_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return TlsIdentity(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def issue_identity(common_name: str, ca: TlsIdentity) -> TlsIdentity:
    """Make a certificate for ``common_name`` signed by the CA ``ca``."""
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return self_signed_identity(common_name, issuer=(ca, ca_key))


def _server_context(identity: TlsIdentity, client_ca_pem: bytes | None, directory: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert_file = directory / f"server-{secrets.token_hex(8)}.pem"
    cert_file.write_bytes(identity.cert_pem + identity.key_pem)
    context.load_cert_chain(cert_file)
    cert_file.unlink()
    if client_ca_pem is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    return context


# --- The HTTP server ----------------------------------------------------------------------


class Fleet:
    """Serve the Keylime agent API of every device on its own port of 127.0.0.1.

    With ``tls_dir`` each device gets a self-signed server certificate (``mtls_certs``), and a
    client must present a certificate issued by ``client_ca_pem`` when that is given.
    """

    def __init__(self, devices: Sequence[SimulatedDevice], *, tls_dir: Path | None = None,
                 client_ca_pem: bytes | None = None) -> None:
        self.devices = {device.device_id: device for device in devices}
        self.tls_dir = tls_dir
        self.client_ca_pem = client_ca_pem
        self.mtls_certs: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet-sim", daemon=True)
        self._servers: list[asyncio.Server] = []
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_all(), self._loop).result(timeout=120)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _start_all(self) -> None:
        for device in self.devices.values():
            context = None
            if self.tls_dir is not None:
                identity = self_signed_identity(device.device_id)
                self.mtls_certs[device.device_id] = identity.cert_pem.decode("ascii")
                context = _server_context(identity, self.client_ca_pem, self.tls_dir)
            server = await asyncio.start_server(
                functools.partial(self._serve, device), "127.0.0.1", device.port, ssl=context, backlog=64
            )
            device.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)

    async def _stop_all(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        # Closing each connection ends its reader, so its task finishes without cancellation.
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, device: SimulatedDevice, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                keep_alive = await self._answer(device, head, writer)
                if not keep_alive:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _answer(self, device: SimulatedDevice, head: bytes, writer: asyncio.StreamWriter) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = (lines[0].split(" ") + ["", "", ""])[:3]
        headers = {line.partition(":")[0].strip().lower(): line.partition(":")[2].strip()
                   for line in lines[1:] if line}
        if not device.reachable:
            writer.transport.abort()
            return False
        if device.answer_delay:
            await asyncio.sleep(device.answer_delay)
        status, body = _route(device, method, target)
        payload = json.dumps(body).encode()
        keep_alive = headers.get("connection", "").lower() != "close"
        writer.write(
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n".encode("ascii") + payload
        )
        await writer.drain()
        return keep_alive


def _route(device: SimulatedDevice, method: str, target: str) -> tuple[int, dict[str, Any]]:
    url = urlsplit(target)
    if method != "GET":
        return 405, {"code": 405, "status": "method not allowed", "results": {}}
    if url.path == "/version":
        versions = {"supported_version": _API_VERSIONS[-1], "supported_versions": list(_API_VERSIONS)}
        return 200, {"code": 200, "status": "Success", "results": versions}
    parts = url.path.strip("/").split("/")
    is_quote_path = len(parts) == 3 and parts[1:] == ["quotes", "integrity"]
    if is_quote_path and parts[0].removeprefix("v") in _API_VERSIONS:
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        return device.answer_quote(query)
    return 404, {"code": 404, "status": f"no route for {url.path}", "results": {}}


# --- Command line -------------------------------------------------------------------------


def _main() -> None:
    parser = argparse.ArgumentParser(description="Serve a simulated fleet of Keylime agents on 127.0.0.1.")
    parser.add_argument("--devices", type=int, default=100, help="number of devices")
    parser.add_argument("--files", type=int, default=200, help="files each device measures at boot")
    parser.add_argument("--entries-per-quote", type=int, default=2,
                        help="IMA entries each device logs before each quote")
    parser.add_argument("--manifest", type=Path, required=True, help="JSON file to write the fleet to")
    parser.add_argument("--tls", type=Path, help="serve mutual TLS; directory for the certificates")
    arguments = parser.parse_args()

    files = make_files(arguments.files)
    devices = [
        SimulatedDevice(str(uuid.uuid4()), files=files, entries_per_quote=arguments.entries_per_quote)
        for _ in range(arguments.devices)
    ]
    client = None
    client_ca = None
    if arguments.tls is not None:
        arguments.tls.mkdir(parents=True, exist_ok=True)
        client_ca = self_signed_identity("fleet-sim client CA", ca=True)
        client = issue_identity("verifier", client_ca)
        (arguments.tls / "client.pem").write_bytes(client.cert_pem)
        (arguments.tls / "client.key").write_bytes(client.key_pem)

    fleet = Fleet(devices, tls_dir=arguments.tls, client_ca_pem=client_ca.cert_pem if client_ca else None)
    fleet.start()
    manifest = {
        "files": {path: digest.hex() for path, digest in files.items()},
        "client_cert": str(arguments.tls / "client.pem") if client else None,
        "client_key": str(arguments.tls / "client.key") if client else None,
        "devices": [
            {"device_id": device.device_id, "port": device.port,
             "ak_tpm": device.tpm.ak_tpm.hex(), "ek_tpm": device.tpm.ek_tpm.hex(),
             "mtls_cert": fleet.mtls_certs.get(device.device_id)}
            for device in devices
        ],
    }
    temporary = arguments.manifest.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, arguments.manifest)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    fleet.stop()


if __name__ == "__main__":
    _main()
