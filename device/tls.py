"""The agent's TLS server certificate and the mutual-TLS context of the agent API.

The agent serves its API over HTTPS with a self-signed certificate (ECDSA P-256, SHA-256) that
it makes once and keeps in ``<agent_state_dir>/tls/``. It sends the certificate's PEM to the
registrar as ``mtls_cert``; a verifier reads it there and trusts exactly that certificate when
it connects. The subject CN is the agent uuid, and the subjectAltName contains the contact address,
so clients that check host names accept it. A new certificate is made when the stored one has
expired, expires within ``RENEW_BEFORE``, or does not name the contact address.

Clients must present a certificate that chains to the CA file in ``agent_client_ca`` (the
verifier's client CA); the TLS handshake fails otherwise.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device.errors import AgentSettingsError, DeviceError
from device.payload import write_private_file

log = logging.getLogger(__name__)

TLS_DIR_NAME: Final = "tls"
CERTIFICATE_FILE_NAME: Final = "agent-cert.pem"
KEY_FILE_NAME: Final = "agent-key.pem"
VALIDITY: Final = dt.timedelta(days=3650)
RENEW_BEFORE: Final = dt.timedelta(days=30)


class AgentTlsError(DeviceError):
    """The agent's TLS files cannot be read, parsed or written."""

    default_code = "agent-tls-invalid"


@dataclass(frozen=True)
class AgentTlsIdentity:
    """The agent's server certificate and key, and the files that hold them."""

    certificate: x509.Certificate
    certificate_file: Path
    key_file: Path

    @property
    def certificate_pem(self) -> str:
        """The certificate as PEM text: the ``mtls_cert`` value sent to the registrar."""
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_or_create_tls_identity(state_dir: Path, agent_id: str, contact_host: str,
                                *, now: dt.datetime | None = None) -> AgentTlsIdentity:
    """Return the stored server certificate, or make and store a new one (see the module
    docstring for when).

    Raises AgentTlsError if a stored file cannot be read or parsed, so that a damaged
    certificate is never silently replaced.
    """
    now = now or dt.datetime.now(dt.UTC)
    directory = state_dir / TLS_DIR_NAME
    certificate_file = directory / CERTIFICATE_FILE_NAME
    key_file = directory / KEY_FILE_NAME

    if certificate_file.exists() and key_file.exists():
        certificate = _load_certificate(certificate_file)
        reason = _renewal_reason(certificate, agent_id, contact_host, now)
        if reason is None:
            return AgentTlsIdentity(certificate, certificate_file, key_file)
        log.info("making a new agent TLS certificate: the one in %s %s", certificate_file, reason)

    certificate, key_pem = _self_signed_certificate(agent_id, contact_host, now)
    try:
        write_private_file(key_file, key_pem)
        write_private_file(certificate_file, certificate.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise AgentTlsError(f"cannot write the agent TLS files in {directory}: {exc.strerror}") from exc
    log.info("stored a new self-signed agent TLS certificate in %s (CN %s, valid until %s)",
             certificate_file, agent_id, certificate.not_valid_after_utc.date())
    return AgentTlsIdentity(certificate, certificate_file, key_file)


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise AgentTlsError(f"cannot read agent TLS certificate {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise AgentTlsError(
            f"agent TLS certificate {path} is not a PEM certificate ({exc}); remove it and its "
            "key to make a new one"
        ) from exc


def _renewal_reason(certificate: x509.Certificate, agent_id: str, contact_host: str,
                    now: dt.datetime) -> str | None:
    """Say why ``certificate`` must be replaced, or return None if it can stay."""
    if certificate.not_valid_after_utc - RENEW_BEFORE <= now:
        return f"expires on {certificate.not_valid_after_utc.date()}"
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [name.value for name in common_names] != [agent_id]:
        return f"is not issued to agent {agent_id}"
    if _subject_alternative_name(contact_host) not in _alternative_names(certificate):
        return f"does not name the contact address {contact_host}"
    return None


def _alternative_names(certificate: x509.Certificate) -> list[x509.GeneralName]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(extension.value)


def _subject_alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _self_signed_certificate(agent_id: str, contact_host: str,
                             now: dt.datetime) -> tuple[x509.Certificate, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_subject_alternative_name(contact_host)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate, key_pem


def server_ssl_context(identity: AgentTlsIdentity, client_ca_file: Path | None) -> ssl.SSLContext:
    """Build the TLS context of the agent API: TLS 1.2 or later, the agent's certificate, and a
    required client certificate that chains to ``client_ca_file``.

    Raises AgentSettingsError when ``client_ca_file`` is unset, missing or contains no usable CA.
    """
    if client_ca_file is None:
        raise AgentSettingsError(
            "setting agent_client_ca is empty; set it to the PEM file of the CA that signs the "
            "verifier's client certificates, or set agent_enable_mtls to false to serve plain "
            "HTTP")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(identity.certificate_file), str(identity.key_file))
    try:
        context.load_verify_locations(cafile=str(client_ca_file))
    except FileNotFoundError:
        raise AgentSettingsError(
            f"setting agent_client_ca is {str(client_ca_file)!r}, which does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise AgentSettingsError(
            f"setting agent_client_ca is {str(client_ca_file)!r}, which contains no usable PEM CA "
            f"certificate: {exc}") from None
    return context
