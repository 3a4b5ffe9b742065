"""TPM access for the device agent, through a tpm2-pytss ESAPI connection.

Handles: a TPM without a resource manager (swtpm, or /dev/tpm0 used directly) has few transient
object slots (3 on swtpm 0.7.1) and keeps objects and sessions loaded after the process that
made them exits. So :meth:`DeviceTpm.connect` flushes every transient object and session it
finds, which assumes the agent is the only user of such a TPM, and every method loads what it
needs and flushes it before it returns, whether it succeeds or fails. Persistent objects are
never flushed. Behind a resource manager (/dev/tpmrm0), TPM2_GetCapability lists only the
connection's own handles.

Each public method's docstring names the TPM commands it issues. A failed command raises
:class:`~device.errors.TpmError` with the command name and the raw response code.

EK selection (:meth:`DeviceTpm.read_endorsement_key`):

1. ``agent_ek_type`` "rsa" has one candidate, RSA-2048 (TCG template L-1, certificate in NV
   index 0x01c00002). "ecc" has two: NIST P-256 (template L-2, NV 0x01c0000a), then NIST P-384
   (high-range template H-3, NV 0x01c00016), the only ECC EK that swtpm_setup 0.7.1 certifies.
2. The first candidate whose certificate NV index is defined is used. The EK is the persistent
   key in 0x81010000-0x8101ffff whose public key equals the certificate's (swtpm_setup 0.7.1
   puts its EKs at 0x81010001 and 0x81010016). If no persistent key matches, the EK is created
   from the TCG template, and it must match the certificate.
3. If no candidate has a certificate, the first one is created from its template and the agent
   registers without an EK certificate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_PT_NV,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMT_SYM_DEF,
    TSS2_Exception,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from device.errors import AgentSettingsError, DeviceError, EndorsementKeyError, TpmError
from evidence.credential import CredentialFile
from evidence.ekcert import describe_public_key, load_ek_certificate
from evidence.errors import ParseError
from evidence.tpm import ObjectAttributes, PublicArea, parse_tpm2b_public

log = logging.getLogger(__name__)

# Persistent handles searched for an EK that matches the EK certificate.
ENDORSEMENT_PERSISTENT_FIRST: Final = 0x81010000
ENDORSEMENT_PERSISTENT_LAST: Final = 0x8101FFFF

# restricted|sign: the AK signs only structures the TPM made (quotes, certify). fixedTPM and
# fixedParent: it can never leave this TPM. sensitiveDataOrigin: the TPM generated it.
# userWithAuth with an empty authValue lets the agent use it without a policy session.
AK_ATTRIBUTES: Final = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)

# agent_ak_type -> tpm2-pytss template text: key, signing scheme, no symmetric algorithm.
AK_TEMPLATES: Final = {
    "rsa": "rsa2048:rsassa-sha256:null",
    "ecc": "ecc256:ecdsa-sha256:null",
}

_DEFAULT_NV_BUFFER_MAX: Final = 512


@dataclass(frozen=True)
class EkProfile:
    """One TCG EK flavour: its key, the tpm2-pytss template name, its certificate's NV index."""

    key_type: str
    description: str
    template: str
    certificate_index: int


# agent_ek_type -> candidates in order of preference (see the module docstring).
EK_PROFILES: Final = {
    "rsa": (EkProfile("rsa", "RSA-2048", "EK-RSA2048", 0x01C00002),),
    "ecc": (
        EkProfile("ecc", "ECC NIST P-256", "EK-ECC256", 0x01C0000A),
        EkProfile("ecc", "ECC NIST P-384", "EK-HIGH-ECC384", 0x01C00016),
    ),
}


@dataclass(frozen=True)
class EndorsementKey:
    """The EK the agent uses and how to load it again.

    ``public`` is its TPM2B_PUBLIC and ``certificate`` the DER EK certificate with NV padding
    cut, or None. Exactly one of ``persistent_handle`` (a persistent object) and ``template``
    (a marshalled TPM2B_PUBLIC that TPM2_CreatePrimary turns into this EK) is set.
    """

    profile: EkProfile
    public: bytes
    certificate: bytes | None
    persistent_handle: int | None
    template: bytes | None = field(default=None, repr=False)

    @property
    def public_area(self) -> PublicArea:
        return parse_tpm2b_public(self.public)

    @property
    def name(self) -> bytes:
        return self.public_area.name

    def describe(self) -> str:
        """Say which EK this is, where it comes from and where its certificate is, for logs."""
        if self.persistent_handle is not None:
            source = f"at persistent handle {self.persistent_handle:#010x}"
        else:
            source = f"created from TCG template {self.profile.template}"
        index = f"{self.profile.certificate_index:#010x}"
        if self.certificate is None:
            certificate = f"no EK certificate (NV index {index} is not defined)"
        else:
            certificate = f"EK certificate from NV index {index}"
        return f"{self.profile.description} EK {source}, {certificate}"


@dataclass(frozen=True)
class AttestationKey:
    """An AK as TPM2_Create returned it: TPM2B_PUBLIC and TPM2B_PRIVATE bytes.

    The private part is encrypted by the EK it was created under, so it loads only in this
    TPM and only under that EK.
    """

    public: bytes
    private: bytes = field(repr=False)

    @property
    def public_area(self) -> PublicArea:
        return parse_tpm2b_public(self.public)

    @property
    def name(self) -> bytes:
        return self.public_area.name


def ek_profiles(ek_type: str) -> tuple[EkProfile, ...]:
    """Return the EK candidates for an ``agent_ek_type`` value, or raise AgentSettingsError."""
    try:
        return EK_PROFILES[ek_type]
    except KeyError:
        raise AgentSettingsError(
            f"setting agent_ek_type is {ek_type!r}; expected one of {', '.join(EK_PROFILES)}"
        ) from None


def ak_template(ak_type: str) -> str:
    """Return the tpm2-pytss AK template for an ``agent_ak_type`` value, or raise
    AgentSettingsError."""
    try:
        return AK_TEMPLATES[ak_type]
    except KeyError:
        raise AgentSettingsError(
            f"setting agent_ak_type is {ak_type!r}; expected one of {', '.join(AK_TEMPLATES)}"
        ) from None


@contextmanager
def _tpm_command(command: str, doing: str) -> Iterator[None]:
    """Turn a TSS2_Exception raised inside the block into a TpmError naming ``command``."""
    try:
        yield
    except TSS2_Exception as exc:
        raise TpmError(command, int(exc.rc), str(exc), doing=doing) from exc


def _unmarshal_exact(kind: Any, data: bytes, label: str) -> Any:
    """Unmarshal a TPM2B of ``kind`` that must fill ``data`` exactly."""
    try:
        value, consumed = kind.unmarshal(data)
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise DeviceError(f"{label} is not a valid {kind.__name__}: {exc}",
                          code="tpm-structure-invalid") from exc
    if consumed != len(data):
        raise DeviceError(
            f"{label} has {len(data) - consumed} bytes after its {consumed}-byte {kind.__name__}",
            code="tpm-structure-invalid",
        )
    return value


def _same_key(first: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
              second: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bool:
    if isinstance(first, rsa.RSAPublicKey) and isinstance(second, rsa.RSAPublicKey):
        return first.public_numbers() == second.public_numbers()
    if isinstance(first, ec.EllipticCurvePublicKey) and isinstance(second, ec.EllipticCurvePublicKey):
        return first.public_numbers() == second.public_numbers()
    return False


class DeviceTpm:
    """One ESAPI connection to the device's TPM.

    Methods are serialised by a lock, because an ESAPI context must not be used by two threads
    at once. Use :meth:`connect` to open one; close it with :meth:`close` or a ``with`` block.
    """

    def __init__(self, esapi: ESAPI, tcti: str):
        self._esapi = esapi
        self.tcti = tcti
        self._lock = threading.RLock()
        self._nv_buffer_max: int | None = None

    @classmethod
    def connect(cls, tcti: str) -> DeviceTpm:
        """Connect with ``tcti`` (Esys_Initialize) and flush stale transient objects and
        sessions (TPM2_GetCapability, TPM2_FlushContext)."""
        with _tpm_command("Esys_Initialize", f"connecting to the TPM with TCTI {tcti!r}"):
            esapi = ESAPI(tcti)
        tpm = cls(esapi, tcti)
        try:
            flushed = tpm.flush_stale_handles()
        except BaseException:
            tpm.close()
            raise
        if flushed:
            log.info("flushed %d transient objects and sessions left in the TPM by an earlier "
                     "process", flushed)
        return tpm

    def close(self) -> None:
        """Close the ESAPI connection (Esys_Finalize); the TPM itself is not touched."""
        with self._lock:
            self._esapi.close()

    @property
    def esapi(self) -> ESAPI:
        """The ESAPI connection, for commands this class does not wrap (device.attest).
        Hold :attr:`lock` while using it."""
        return self._esapi

    @property
    def lock(self) -> threading.RLock:
        """The re-entrant lock that serialises every command on this connection."""
        return self._lock

    def __enter__(self) -> DeviceTpm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # --- Handles ---------------------------------------------------------------------------

    def transient_handles(self) -> list[int]:
        """List the loaded transient objects (TPM2_GetCapability, TPM_CAP_HANDLES)."""
        with self._lock:
            return self._handles(TPM2_HT.TRANSIENT)

    def session_handles(self) -> list[int]:
        """List loaded and saved sessions (TPM2_GetCapability, TPM_CAP_HANDLES)."""
        with self._lock:
            return self._handles(TPM2_HT.LOADED_SESSION) + self._handles(TPM2_HT.SAVED_SESSION)

    def flush_stale_handles(self) -> int:
        """Flush every transient object and session (TPM2_GetCapability, TPM2_FlushContext);
        return how many were flushed."""
        with self._lock:
            stale = (self._handles(TPM2_HT.TRANSIENT) + self._handles(TPM2_HT.LOADED_SESSION)
                     + self._handles(TPM2_HT.SAVED_SESSION))
            for handle in stale:
                doing = f"flushing stale handle {handle:#010x}"
                with _tpm_command("TPM2_FlushContext", doing):
                    self._esapi.flush_context(self._esapi.tr_from_tpmpublic(handle))
            return len(stale)

    def _handles(self, handle_type: TPM2_HT, first: int | None = None,
                 last: int | None = None) -> list[int]:
        start = int(handle_type) << 24 if first is None else first
        found: list[int] = []
        more = True
        while more:
            with _tpm_command("TPM2_GetCapability", f"listing handles from {start:#010x}"):
                more, data = self._esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
            handles = [int(handle) for handle in data.data.handles]
            if not handles:
                break
            found.extend(handles)
            if last is not None and handles[-1] >= last:
                break
            start = handles[-1] + 1
        if last is not None:
            found = [handle for handle in found if handle <= last]
        return found

    def _flush(self, handle: ESYS_TR, label: str) -> None:
        """Flush a transient object or session, and log a failure instead of raising it.

        Callers flush in ``finally`` blocks, where raising would hide the original error.
        """
        try:
            self._esapi.flush_context(handle)
        except TSS2_Exception as exc:
            log.warning("TPM2_FlushContext of the %s failed: response code %#x (%s)",
                        label, int(exc.rc), exc)

    # --- NV indexes and the EK certificate -------------------------------------------------

    def read_ek_certificate(self, nv_index: int) -> bytes | None:
        """Read the EK certificate in ``nv_index`` and return its DER with NV padding cut, or
        None when the index is not defined (TPM2_GetCapability, TPM2_NV_ReadPublic,
        TPM2_NV_Read)."""
        with self._lock:
            if not self._nv_index_defined(nv_index):
                return None
            raw = self._read_nv(nv_index)
        try:
            return load_ek_certificate(raw).der
        except ParseError as exc:
            raise EndorsementKeyError(
                f"NV index {nv_index:#010x} does not contain a valid EK certificate: {exc.message}",
                code="ek-certificate-malformed",
            ) from exc

    def _nv_index_defined(self, nv_index: int) -> bool:
        return nv_index in self._handles(TPM2_HT.NV_INDEX, first=nv_index, last=nv_index)

    def _read_nv(self, nv_index: int) -> bytes:
        doing = f"reading NV index {nv_index:#010x}"
        with _tpm_command("TPM2_NV_ReadPublic", doing):
            nv_handle = self._esapi.tr_from_tpmpublic(nv_index)
        try:
            with _tpm_command("TPM2_NV_ReadPublic", doing):
                nv_public, _ = self._esapi.nv_read_public(nv_handle)
            size = int(nv_public.nvPublic.dataSize)
            chunk = self._max_nv_chunk()
            data = bytearray()
            while len(data) < size:
                with _tpm_command("TPM2_NV_Read", doing):
                    part = self._esapi.nv_read(nv_handle, min(chunk, size - len(data)), len(data))
                data += bytes(part)
            return bytes(data)
        finally:
            self._esapi.tr_close(nv_handle)

    def _max_nv_chunk(self) -> int:
        if self._nv_buffer_max is None:
            with _tpm_command("TPM2_GetCapability", "reading TPM_PT_NV_BUFFER_MAX"):
                _, data = self._esapi.get_capability(
                    TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
            values = {int(p.property): int(p.value) for p in data.data.tpmProperties}
            self._nv_buffer_max = values.get(int(TPM2_PT_NV.BUFFER_MAX), _DEFAULT_NV_BUFFER_MAX)
        return self._nv_buffer_max

    def _nv_reader(self) -> Callable[[int], bytes]:
        """Return an NV read callback for ``create_ek_template`` that probes indexes with
        TPM2_GetCapability first, so absent indexes cause no ESYS error log lines."""
        def read(index: int) -> bytes:
            if not self._nv_index_defined(int(index)):
                raise NoSuchIndex(index)
            return self._read_nv(int(index))
        return read

    # --- The EK ----------------------------------------------------------------------------

    def read_endorsement_key(self, ek_type: str) -> EndorsementKey:
        """Find the EK for ``agent_ek_type`` as the module docstring describes
        (TPM2_GetCapability, TPM2_NV_ReadPublic, TPM2_NV_Read, TPM2_ReadPublic and, for an EK
        made from its template, TPM2_CreatePrimary and TPM2_FlushContext)."""
        profiles = ek_profiles(ek_type)
        with self._lock:
            for profile in profiles:
                certificate = self.read_ek_certificate(profile.certificate_index)
                if certificate is not None:
                    return self._certified_ek(profile, certificate)
            return self._ek_from_template(profiles[0], None)

    def _certified_ek(self, profile: EkProfile, certificate: bytes) -> EndorsementKey:
        certified_key = load_ek_certificate(certificate).public_key
        persistent = self._find_persistent_key(certified_key)
        if persistent is not None:
            handle, public = persistent
            return EndorsementKey(profile, public, certificate, handle)
        return self._ek_from_template(profile, certificate)

    def _find_persistent_key(
        self, wanted: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    ) -> tuple[int, bytes] | None:
        handles = self._handles(TPM2_HT.PERSISTENT, first=ENDORSEMENT_PERSISTENT_FIRST,
                                last=ENDORSEMENT_PERSISTENT_LAST)
        for handle in handles:
            public = self._read_persistent_public(handle)
            try:
                area = parse_tpm2b_public(public)
            except ParseError:
                continue  # not an RSA or ECC key this agent can use, so it is not the EK
            if _same_key(area.public_key, wanted):
                return handle, public
        return None

    def _read_persistent_public(self, handle: int) -> bytes:
        with _tpm_command("TPM2_ReadPublic", f"reading persistent object {handle:#010x}"):
            object_handle = self._esapi.tr_from_tpmpublic(handle)
        try:
            with _tpm_command("TPM2_ReadPublic", f"reading persistent object {handle:#010x}"):
                public, _, _ = self._esapi.read_public(object_handle)
            return bytes(public.marshal())
        finally:
            self._esapi.tr_close(object_handle)

    def _ek_from_template(self, profile: EkProfile, certificate: bytes | None) -> EndorsementKey:
        try:
            _, template = create_ek_template(profile.template, self._nv_reader())
        except ValueError as exc:
            raise EndorsementKeyError(
                f"cannot build the {profile.description} EK template {profile.template}: {exc}"
            ) from exc
        template_bytes = bytes(template.marshal())
        handle, public = self._create_primary_ek(template_bytes)
        self._flush(handle, "EK")

        if certificate is not None:
            certified_key = load_ek_certificate(certificate).public_key
            created_key = parse_tpm2b_public(public).public_key
            if not _same_key(certified_key, created_key):
                raise EndorsementKeyError(
                    f"the EK certificate in NV index {profile.certificate_index:#010x} certifies "
                    f"{describe_public_key(certified_key)}, but the EK created from TCG template "
                    f"{profile.template} is {describe_public_key(created_key)}, and no persistent "
                    "key matches the certificate",
                    code="ek-certificate-mismatch",
                )
        return EndorsementKey(profile, public, certificate, None, template_bytes)

    def _create_primary_ek(self, template: bytes) -> tuple[ESYS_TR, bytes]:
        in_public = _unmarshal_exact(TPM2B_PUBLIC, template, "EK template")
        with _tpm_command("TPM2_CreatePrimary", "creating the EK in the endorsement hierarchy"):
            handle, public, _, _, _ = self._esapi.create_primary(
                None, in_public, ESYS_TR.ENDORSEMENT)
        return handle, bytes(public.marshal())

    @contextmanager
    def _loaded_ek(self, ek: EndorsementKey) -> Iterator[ESYS_TR]:
        """Yield an ESYS handle of ``ek``; raise EndorsementKeyError if the TPM's key at that
        place is no longer ``ek`` (the TPM was cleared, or its EK was replaced)."""
        persistent = ek.persistent_handle
        if persistent is not None:
            if not self._handles(TPM2_HT.PERSISTENT, first=persistent, last=persistent):
                raise EndorsementKeyError(
                    f"the {ek.describe()} is gone: no persistent object at {persistent:#010x}",
                    code="ek-changed",
                )
            doing = f"reading the EK at persistent handle {persistent:#010x}"
            with _tpm_command("TPM2_ReadPublic", doing):
                handle = self._esapi.tr_from_tpmpublic(persistent)
            try:
                with _tpm_command("TPM2_ReadPublic", doing):
                    public, _, _ = self._esapi.read_public(handle)
                self._check_same_ek(ek, bytes(public.marshal()))
                yield handle
            finally:
                self._esapi.tr_close(handle)
            return

        if ek.template is None:
            raise ValueError("an EndorsementKey needs a persistent handle or a template")
        handle, public = self._create_primary_ek(ek.template)
        try:
            self._check_same_ek(ek, public)
            yield handle
        finally:
            self._flush(handle, "EK")

    @staticmethod
    def _check_same_ek(ek: EndorsementKey, public: bytes) -> None:
        if public != ek.public:
            found = parse_tpm2b_public(public).name.hex()
            raise EndorsementKeyError(
                f"the {ek.describe()} now has name {found}, expected {ek.name.hex()}; "
                "the TPM was cleared or its EK was replaced",
                code="ek-changed",
            )

    @contextmanager
    def _ek_authorization(self, ek: EndorsementKey) -> Iterator[ESYS_TR]:
        """Yield a session that authorises use of the EK (USER role).

        The TCG low-range EK templates clear userWithAuth and set authPolicy to
        PolicySecret(TPM_RH_ENDORSEMENT), so they need a policy session. The high-range
        templates (swtpm's P-384 EK) set userWithAuth, so the EK's empty authValue works.
        """
        area = ek.public_area
        if area.object_attributes & ObjectAttributes.USER_WITH_AUTH:
            yield ESYS_TR.PASSWORD
            return

        doing = "starting the policy session for the EK"
        with _tpm_command("TPM2_StartAuthSession", doing):
            session = self._esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG(int(area.name_alg)))
        try:
            doing = "satisfying the EK policy PolicySecret(TPM_RH_ENDORSEMENT)"
            with _tpm_command("TPM2_PolicySecret", doing):
                self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            yield session
        finally:
            self._flush(session, "EK policy session")

    # --- The AK ----------------------------------------------------------------------------

    def create_ak(self, ek: EndorsementKey, ak_type: str) -> AttestationKey:
        """Create a restricted signing AK as a child of the EK (TPM2_CreatePrimary or
        TPM2_ReadPublic for the EK, TPM2_StartAuthSession, TPM2_PolicySecret, TPM2_Create,
        TPM2_FlushContext)."""
        in_public = TPM2B_PUBLIC.parse(ak_template(ak_type), objectAttributes=AK_ATTRIBUTES,
                                       nameAlg="sha256")
        with self._lock, self._loaded_ek(ek) as ek_handle, self._ek_authorization(ek) as session:
            with _tpm_command("TPM2_Create", f"creating the {ak_type} AK under the EK"):
                private, public, _, _, _ = self._esapi.create(
                    ek_handle, None, in_public, session1=session)
        return AttestationKey(public=bytes(public.marshal()), private=bytes(private.marshal()))

    @contextmanager
    def _loaded_ak(self, ek: EndorsementKey, ek_handle: ESYS_TR,
                   ak: AttestationKey) -> Iterator[ESYS_TR]:
        private = _unmarshal_exact(TPM2B_PRIVATE, ak.private, "AK private blob")
        public = _unmarshal_exact(TPM2B_PUBLIC, ak.public, "AK public blob")
        with self._ek_authorization(ek) as session:
            with _tpm_command("TPM2_Load", "loading the AK under the EK"):
                handle = self._esapi.load(ek_handle, private, public, session1=session)
        try:
            yield handle
        finally:
            self._flush(handle, "AK")

    def check_ak_loads(self, ek: EndorsementKey, ak: AttestationKey) -> None:
        """Load the AK under the EK and flush it again, which proves that the AK blobs belong
        to this TPM and this EK (TPM2_Load, TPM2_FlushContext, and the EK commands of
        :meth:`create_ak`)."""
        with self._lock, self._loaded_ek(ek) as ek_handle, self._loaded_ak(ek, ek_handle, ak):
            pass

    def load_ak(self, ek: EndorsementKey, ak: AttestationKey) -> ESYS_TR:
        """Load the AK under the EK and leave it loaded, for quotes; the caller flushes it
        (TPM2_Load, and the EK commands of :meth:`create_ak`)."""
        private = _unmarshal_exact(TPM2B_PRIVATE, ak.private, "AK private blob")
        public = _unmarshal_exact(TPM2B_PUBLIC, ak.public, "AK public blob")
        with (self._lock, self._loaded_ek(ek) as ek_handle,
              self._ek_authorization(ek) as session,
              _tpm_command("TPM2_Load", "loading the AK under the EK")):
            handle: ESYS_TR = self._esapi.load(ek_handle, private, public, session1=session)
        return handle

    def activate_credential(self, ek: EndorsementKey, ak: AttestationKey,
                            credential: CredentialFile) -> bytes:
        """Recover the secret of a credential made for this EK and the AK's name
        (TPM2_Load, TPM2_ActivateCredential, TPM2_FlushContext, and the EK commands of
        :meth:`create_ak`).

        A credential made for another EK or another AK fails with a TpmError from
        TPM2_ActivateCredential.
        """
        id_object = TPM2B_ID_OBJECT(credential=credential.id_object)
        encrypted_secret = TPM2B_ENCRYPTED_SECRET(secret=credential.encrypted_secret)
        with self._lock, self._loaded_ek(ek) as ek_handle:
            with self._loaded_ak(ek, ek_handle, ak) as ak_handle:
                with self._ek_authorization(ek) as session:
                    doing = "recovering the registrar's credential"
                    with _tpm_command("TPM2_ActivateCredential", doing):
                        recovered = self._esapi.activate_credential(
                            ak_handle, ek_handle, id_object, encrypted_secret,
                            session1=ESYS_TR.PASSWORD, session2=session)
        return bytes(recovered)
