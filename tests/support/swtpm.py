"""Run swtpm as a TPM 2.0 simulator for tests, and drive it from tpm2-pytss or tpm2-tools.

``SwtpmProcess`` starts ``swtpm socket`` as a foreground child on a free 127.0.0.1 port pair
(control port = server port + 1, which the ``swtpm:`` TCTI assumes) with an absolute state
directory, waits until the server port accepts connections, and stops it on ``stop()`` or at
the end of a ``with`` block. The state directory may be one that ``swtpm_setup`` provisioned
with EK certificates. Each start with ``startup-clear`` increments the TPM's resetCount.

Usage in a test module (skips the test when the swtpm binary is missing)::

    import pytest

from device import emulator
    from tests.support.swtpm import SwtpmProcess

    @pytest.fixture
    def tpm(tmp_path):
        with SwtpmProcess(tmp_path / "tpm-state") as tpm:
            yield tpm

    def test_something(tpm):
        esapi = tpm.esapi()        # tpm2-pytss ESAPI connected to this swtpm
        tpm.run_tool("tpm2_getrandom", "8")

swtpm has no resource manager and only 3 slots for transient objects, which stay loaded
across connections. ``TpmDevice`` flushes leftovers when it connects and flushes each object
it is done with; ``run_tool`` runs ``tpm2_flushcontext -t`` after each tpm2-tools command.
Do not hold ESAPI objects loaded while tpm2-tools runs on the same swtpm, because that flush
also removes them.

``TpmDevice`` wraps tpm2-pytss for the device side of attestation tests: EKs from the TCG
templates, AKs as children of the EK, quotes, PCR reads and credential activation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device import emulator

# Keeps ESYS from logging warnings for absent NV indexes that NVReadEK probes.
os.environ.setdefault("TSS2_LOG", "all+none")


def require_swtpm() -> str:
    """Return the path of the swtpm binary, or skip the calling test if it is not installed."""
    path = shutil.which("swtpm")
    if path is None:
        pytest.skip("swtpm is not installed (Debian package swtpm)")
    return path


def require_tpm2_tools() -> None:
    """Skip the calling test unless tpm2-tools is installed."""
    if shutil.which("tpm2_quote") is None:
        pytest.skip("tpm2-tools is not installed (Debian package tpm2-tools)")


class SwtpmProcess(emulator.SwtpmProcess):
    """A ``swtpm socket --tpm2`` child process bound to 127.0.0.1, with test conveniences.

    The process handling lives in :class:`device.emulator.SwtpmProcess`; this subclass skips
    the test when swtpm is missing and adds tpm2-tools and tpm2-pytss access.
    """

    def start(self) -> SwtpmProcess:
        require_swtpm()
        super().start()
        return self

    def __enter__(self) -> SwtpmProcess:
        return self.start()

    def tool_env(self) -> dict[str, str]:
        """Environment for tpm2-tools commands aimed at this swtpm."""
        return {**os.environ, "TPM2TOOLS_TCTI": self.tcti, "TSS2_LOG": "all+none"}

    def run_tool(
        self, *args: str, cwd: Path | str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one tpm2-tools command, then flush the transient objects it left loaded.

        Raises AssertionError with the command's output if it exits non-zero.
        """
        result = subprocess.run(
            list(args), cwd=cwd, env=self.tool_env(), capture_output=True, text=True,
            timeout=60, check=False,
        )
        subprocess.run(
            ["tpm2_flushcontext", "-t"], env=self.tool_env(), capture_output=True, timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited with {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def esapi(self) -> Any:
        """Return a tpm2-pytss ESAPI connected to this swtpm; skip if tpm2-pytss is missing."""
        tpm2_pytss = pytest.importorskip("tpm2_pytss")
        return tpm2_pytss.ESAPI(self.tcti)


@contextlib.contextmanager
def running_swtpm(state_dir: Path) -> Iterator[SwtpmProcess]:
    """Context manager form for fixtures: ``with running_swtpm(tmp_path / "tpm") as tpm``."""
    with SwtpmProcess(state_dir) as tpm:
        yield tpm


# --- device side with tpm2-pytss --------------------------------------------------------

AK_TEMPLATES = {
    "rsassa-sha256": "rsa2048:rsassa-sha256:null",
    "rsassa-sha1": "rsa2048:rsassa-sha1:null",
    "rsassa-sha384": "rsa2048:rsassa-sha384:null",
    "rsassa-sha512": "rsa2048:rsassa-sha512:null",
    "rsapss-sha256": "rsa2048:rsapss-sha256:null",
    "ecdsa-sha256": "ecc256:ecdsa-sha256:null",
    "ecdsa-sha384": "ecc384:ecdsa-sha384:null",
    "ecdsa-sha512": "ecc521:ecdsa-sha512:null",
}


@dataclass(frozen=True)
class AkBlobs:
    """An AK created under an EK: its TPM2B_PRIVATE and TPM2B_PUBLIC (tpm2-pytss objects)."""

    private: Any
    public: Any

    @property
    def public_bytes(self) -> bytes:
        """TPM2B_PUBLIC bytes, what an agent sends to the registrar."""
        return bytes(self.public.marshal())


@dataclass(frozen=True)
class EkHandle:
    handle: Any
    public: Any

    @property
    def public_bytes(self) -> bytes:
        return bytes(self.public.marshal())


class TpmDevice:
    """Device-side TPM operations over one ESAPI connection, flushing what it loads."""

    def __init__(self, tpm: SwtpmProcess) -> None:
        tpm2_pytss = pytest.importorskip("tpm2_pytss")

        self.t = tpm2_pytss
        self.esapi = tpm2_pytss.ESAPI(tpm.tcti)
        self.flush_all()

    def close(self) -> None:
        self.esapi.close()

    def __enter__(self) -> TpmDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush_all()
        self.close()

    def flush_all(self) -> None:
        """Flush every transient object and session, including those an earlier run left."""
        t = self.t
        for handle_type in (t.TPM2_HT.TRANSIENT, t.TPM2_HT.LOADED_SESSION, t.TPM2_HT.SAVED_SESSION):
            _, capability = self.esapi.get_capability(
                t.TPM2_CAP.HANDLES, handle_type << 24, 64
            )
            for handle in capability.data.handles:
                self.esapi.flush_context(self.esapi.tr_from_tpmpublic(handle))

    def create_ek(self, template: str = "EK-RSA2048") -> EkHandle:
        """Create the EK primary from a TCG template name (EK-RSA2048, EK-ECC256, ...)."""
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        _, template_public = create_ek_template(template, NVReadEK(self.esapi))
        handle, public, *_ = self.esapi.create_primary(
            None, template_public, self.t.ESYS_TR.ENDORSEMENT
        )
        return EkHandle(handle, public)

    def _ek_policy_session(self) -> Any:
        """Start a policy session satisfying the EK's PolicySecret(TPM_RH_ENDORSEMENT)."""
        t = self.t
        session = self.esapi.start_auth_session(
            t.ESYS_TR.NONE, t.ESYS_TR.NONE, t.TPM2_SE.POLICY,
            t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL), t.TPM2_ALG.SHA256,
        )
        self.esapi.policy_secret(t.ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        return session

    def create_ak(
        self, ek: EkHandle, kind: str = "rsassa-sha256", attributes: Any = None
    ) -> AkBlobs:
        """Create an AK as a child of the EK; ``kind`` is a key of AK_TEMPLATES."""
        t = self.t
        if attributes is None:
            attributes = (
                t.TPMA_OBJECT.RESTRICTED | t.TPMA_OBJECT.SIGN_ENCRYPT | t.TPMA_OBJECT.FIXEDTPM
                | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
                | t.TPMA_OBJECT.USERWITHAUTH
            )
        template = t.TPM2B_PUBLIC.parse(AK_TEMPLATES[kind], objectAttributes=attributes)
        session = self._ek_policy_session()
        try:
            private, public, *_ = self.esapi.create(ek.handle, None, template, session1=session)
        finally:
            self.esapi.flush_context(session)
        return AkBlobs(private, public)

    @contextlib.contextmanager
    def loaded(self, ek: EkHandle, ak: AkBlobs) -> Iterator[Any]:
        """Load the AK under the EK for the duration of the block, then flush it."""
        session = self._ek_policy_session()
        try:
            handle = self.esapi.load(ek.handle, ak.private, ak.public, session1=session)
        finally:
            self.esapi.flush_context(session)
        try:
            yield handle
        finally:
            self.esapi.flush_context(handle)

    def read_public(self, handle: Any) -> tuple[bytes, bytes, bytes]:
        """Return (TPM2B_PUBLIC, name, qualified name) as the TPM reports them."""
        public, name, qualified_name = self.esapi.read_public(handle)
        return bytes(public.marshal()), bytes(name), bytes(qualified_name)

    def extend(self, pcr: int, data: bytes, banks: Sequence[str] = ("sha1", "sha256")) -> None:
        """Extend PCR ``pcr`` in each bank with the bank's hash of ``data``."""
        t = self.t
        digests = []
        for bank in banks:
            algorithm = getattr(t.TPM2_ALG, bank.upper())
            digest = hashlib.new(bank, data).digest()
            digests.append(t.TPMT_HA(hashAlg=algorithm, digest=t.TPMU_HA(**{bank: digest})))
        self.esapi.pcr_extend(
            getattr(t.ESYS_TR, f"PCR{pcr}"), t.TPML_DIGEST_VALUES(digests)
        )

    def quote(self, ak_handle: Any, selection: Any, nonce: bytes) -> tuple[bytes, bytes]:
        """Quote ``selection`` (text or TPML_PCR_SELECTION).

        Returns the TPMS_ATTEST bytes and the TPMT_SIGNATURE bytes.
        """
        attest, signature = self.esapi.quote(ak_handle, selection, nonce)
        return bytes(attest), bytes(signature.marshal())

    def pcr_read(self, selection: str) -> dict[str, dict[int, bytes]]:
        """Read PCR values of ``selection`` (e.g. ``sha256:0,1,10``), 8 at most per command."""
        result: dict[str, dict[int, bytes]] = {}
        for part in selection.split("+"):
            bank, _, indexes = part.partition(":")
            pcrs = [int(index) for index in indexes.split(",")]
            for start in range(0, len(pcrs), 8):
                chunk = pcrs[start : start + 8]
                _, _, digests = self.esapi.pcr_read(f"{bank}:{','.join(map(str, chunk))}")
                for index, digest in zip(chunk, digests, strict=True):
                    result.setdefault(bank, {})[index] = bytes(digest)
        return result

    def activate_credential(self, ek: EkHandle, ak_handle: Any, credential_file: bytes) -> bytes:
        """Run TPM2_ActivateCredential on a tpm2-tools credential file; return the secret."""
        t = self.t
        id_object, offset = _read_tpm2b(credential_file, 8)
        encrypted_secret, _ = _read_tpm2b(credential_file, offset)
        session = self._ek_policy_session()
        try:
            secret = self.esapi.activate_credential(
                ak_handle, ek.handle,
                t.TPM2B_ID_OBJECT(credential=id_object),
                t.TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret),
                session1=t.ESYS_TR.PASSWORD, session2=session,
            )
        finally:
            self.esapi.flush_context(session)
        return bytes(secret)


def _read_tpm2b(data: bytes, offset: int) -> tuple[bytes, int]:
    size = int.from_bytes(data[offset : offset + 2], "big")
    return data[offset + 2 : offset + 2 + size], offset + 2 + size
