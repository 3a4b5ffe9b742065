"""Quote collection on the device: PCR banks, PCR reads and extends, and TPM2_Quote.

``AttestationTpm`` issues the PCR and quote commands over the agent's one ESAPI connection.
A TPM without a resource manager (swtpm, /dev/tpm0) serves one command stream, so every
caller (the agent API, the IMA simulator, the event log replay) acquires ``AttestationTpm.lock``
around the commands that must not interleave. It is the same re-entrant lock that
``device.tpm.DeviceTpm`` serialises its own methods with.

``AgentQuoter`` builds the response to a Keylime integrity or identity request:

1. Select the requested PCRs plus PCR 16 in the AK's hash bank (the bank of its signing
   scheme, as rust-keylime 0.2.9 quotes).
2. TPM2_PCR_Reset PCR 16 and TPM2_PCR_Extend it with H(payload public key PEM), in that bank
   only (``device.payload``).
3. TPM2_PCR_Read the selected PCRs, then TPM2_Quote them with the nonce as qualifying data.
4. Check that the quote's pcrDigest covers the values read. The kernel may extend PCR 10
   between the two commands, so a mismatch is retried up to ``QUOTE_ATTEMPTS`` times, as
   rust-keylime does.

The AK stays loaded between quotes (one of the 3 transient object slots of swtpm 0.7.1) and
is loaded again when the TPM no longer knows its handle.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_CAP,
    TPM2_RC,
    TPML_DIGEST_VALUES,
    TPMT_HA,
    TPMU_HA,
    TSS2_RC,
    TSS2_Exception,
)

from device.errors import DeviceError, TpmError
from device.payload import DATA_PCR, PayloadKey
from device.tpm import AttestationKey, DeviceTpm, EndorsementKey
from evidence.tpm import (
    PcrBank,
    PcrSelection,
    PublicArea,
    TpmAlg,
    digest_size,
    format_keylime_quote,
    hash_function,
    marshal_pcr_file,
    parse_tpm2b_public,
    parse_tpml_pcr_selection,
    parse_tpms_attest,
)

log = logging.getLogger(__name__)

# PC Client TPMs have 24 PCRs; a Keylime mask names PCRs by bit, bit 0 being PCR 0.
PCR_COUNT: Final = 24
QUOTE_ATTEMPTS: Final = 5
MAX_QUALIFYING_DATA: Final = 64

# PCR banks that the agent can hash for, with the TPMU_HA member name of each.
_BANK_FIELDS: Final = {
    TpmAlg.SHA1: "sha1",
    TpmAlg.SHA256: "sha256",
    TpmAlg.SHA384: "sha384",
    TpmAlg.SHA512: "sha512",
}
# Keylime's names for the AK's signing scheme and key type.
_SIGN_ALG_NAMES: Final = {TpmAlg.RSASSA: "rsassa", TpmAlg.RSAPSS: "rsapss", TpmAlg.ECDSA: "ecdsa"}
_ENC_ALG_NAMES: Final = {TpmAlg.RSA: "rsa", TpmAlg.ECC: "ecc"}
# TPM response codes (format-one parameter and handle numbers stripped) that mean no object is
# loaded at a transient handle any more, for example after another process flushed it.
_HANDLE_GONE: Final = frozenset({int(TPM2_RC.HANDLE), int(TPM2_RC.REFERENCE_H0)})


class QuoteError(DeviceError):
    """The TPM's quotes did not match the PCR values read beside them on every attempt."""

    default_code = "quote-pcr-mismatch"


@contextmanager
def tpm_command(command: str, doing: str) -> Iterator[None]:
    """Turn a TSS2_Exception raised inside the block into a TpmError naming ``command``."""
    try:
        yield
    except TSS2_Exception as exc:
        raise TpmError(command, int(exc.rc), str(exc), doing=doing) from exc


def bank_name(bank: TpmAlg) -> str:
    """Return the lowercase name of a PCR bank (``sha256``), as Keylime and IMA write it."""
    return _BANK_FIELDS[bank]


def pcr_handle(index: int) -> ESYS_TR:
    """Return the ESYS handle of PCR ``index``."""
    if not 0 <= index < PCR_COUNT:
        raise ValueError(f"PCR index {index} is outside 0-{PCR_COUNT - 1}")
    return ESYS_TR(int(ESYS_TR.PCR0) + index)


def single_bank_selection(bank: TpmAlg, pcrs: Iterable[int]) -> PcrSelection:
    """Return a selection of ``pcrs`` in one bank, indexes ascending."""
    return PcrSelection((PcrBank(bank, tuple(sorted(set(pcrs)))),))


def selection_digest(bank: TpmAlg, selection: PcrSelection,
                     values: Mapping[TpmAlg, Mapping[int, bytes]]) -> bytes:
    """Compute a quote's pcrDigest: H_bank over the selected values in selection order."""
    digest = hash_function(bank)()
    for selected in selection.banks:
        for index in selected.pcrs:
            digest.update(values[selected.hash_alg][index])
    return bytes(digest.digest())


class AttestationTpm:
    """The PCR and quote commands, over an ESAPI connection shared with ``DeviceTpm``.

    Every method acquires ``lock`` while it talks to the TPM. Callers that need several
    commands without interleaving acquire it around all of them, which works because it is
    re-entrant.
    """

    def __init__(self, esapi: ESAPI, lock: threading.RLock):
        self._esapi = esapi
        self.lock = lock
        self._banks: tuple[TpmAlg, ...] | None = None

    @classmethod
    def for_device(cls, tpm: DeviceTpm) -> AttestationTpm:
        """Share ``tpm``'s ESAPI connection and lock."""
        return cls(tpm.esapi, tpm.lock)

    @property
    def esapi(self) -> ESAPI:
        return self._esapi

    def allocated_banks(self) -> tuple[TpmAlg, ...]:
        """Return the allocated PCR banks the agent can hash for, in the TPM's order
        (TPM2_GetCapability, TPM_CAP_PCRS); cached after the first call."""
        if self._banks is None:
            with self.lock, tpm_command("TPM2_GetCapability", "listing the allocated PCR banks"):
                _, capability = self._esapi.get_capability(TPM2_CAP.PCRS, 0, 1)
            selection = parse_tpml_pcr_selection(bytes(capability.data.assignedPCR.marshal()))
            self._banks = tuple(bank.hash_alg for bank in selection.banks
                                if bank.pcrs and bank.hash_alg in _BANK_FIELDS)
        return self._banks

    def read_pcrs(self, selection: PcrSelection) -> dict[TpmAlg, dict[int, bytes]]:
        """Read every PCR of ``selection`` (TPM2_PCR_Read, which returns at most 8 values per
        command, so it is repeated for the rest)."""
        values: dict[TpmAlg, dict[int, bytes]] = {}
        with self.lock:
            for bank in selection.banks:
                values[bank.hash_alg] = self._read_bank(bank.hash_alg, bank.pcrs)
        return values

    def _read_bank(self, bank: TpmAlg, pcrs: Iterable[int]) -> dict[int, bytes]:
        remaining = sorted(set(pcrs))
        values: dict[int, bytes] = {}
        while remaining:
            text = str(single_bank_selection(bank, remaining))
            with tpm_command("TPM2_PCR_Read", f"reading PCRs {text}"):
                _, selection_out, digests = self._esapi.pcr_read(text)
            returned = [index for selected in
                        parse_tpml_pcr_selection(bytes(selection_out.marshal())).banks
                        for index in selected.pcrs]
            if not returned:
                raise DeviceError(
                    f"TPM2_PCR_Read returned no values for {text}; the {bank_name(bank)} bank "
                    "is not allocated for these PCRs",
                    code="pcr-bank-unavailable")
            for index, digest in zip(returned, digests, strict=True):
                values[index] = bytes(digest)
            remaining = [index for index in remaining if index not in values]
        return values

    def extend_pcr(self, index: int, digests: Mapping[TpmAlg, bytes]) -> None:
        """Extend PCR ``index`` in each bank of ``digests`` in one command (TPM2_PCR_Extend
        with a TPML_DIGEST_VALUES)."""
        values = [TPMT_HA(hashAlg=int(bank), digest=TPMU_HA(**{_BANK_FIELDS[bank]: digest}))
                  for bank, digest in digests.items()]
        with self.lock, tpm_command("TPM2_PCR_Extend", f"extending PCR {index}"):
            self._esapi.pcr_extend(pcr_handle(index), TPML_DIGEST_VALUES(values))

    def reset_pcr(self, index: int) -> None:
        """Reset PCR ``index`` to zeros in every bank (TPM2_PCR_Reset); only resettable PCRs
        such as 16 and 23 allow it at locality 0."""
        with self.lock, tpm_command("TPM2_PCR_Reset", f"resetting PCR {index}"):
            self._esapi.pcr_reset(pcr_handle(index))

    def quote(self, ak_handle: ESYS_TR, selection: PcrSelection,
              qualifying_data: bytes) -> tuple[bytes, bytes]:
        """Quote ``selection`` with the AK's own scheme (TPM2_Quote); return the TPMS_ATTEST
        and TPMT_SIGNATURE bytes."""
        with self.lock, tpm_command("TPM2_Quote", f"quoting PCRs {selection}"):
            attest, signature = self._esapi.quote(ak_handle, str(selection), qualifying_data)
        return bytes(attest), bytes(signature.marshal())

    def flush(self, handle: ESYS_TR, label: str) -> None:
        """Flush a transient object (TPM2_FlushContext); log a failure instead of raising."""
        with self.lock:
            try:
                self._esapi.flush_context(handle)
            except TSS2_Exception as exc:
                log.warning("TPM2_FlushContext of the %s failed: response code %#x (%s)",
                            label, int(exc.rc), exc)


@dataclass(frozen=True)
class QuoteEvidence:
    """One quote: TPMS_ATTEST and TPMT_SIGNATURE bytes, the selection quoted and the PCR
    values read beside it, which the quote's pcrDigest covers."""

    attest: bytes
    signature: bytes
    selection: PcrSelection
    pcr_values: dict[TpmAlg, dict[int, bytes]]

    @property
    def pcr_file(self) -> bytes:
        """The PCR values in the tpm2-tools file layout that Keylime's checkquote reads."""
        return marshal_pcr_file(self.selection, self.pcr_values)

    def keylime_quote(self) -> str:
        """The ``quote`` string of a Keylime agent response."""
        return format_keylime_quote(self.attest, self.signature, self.pcr_file)


def device_ak_loader(tpm: DeviceTpm, ek: EndorsementKey, ak: AttestationKey) -> Callable[[], ESYS_TR]:
    """Return a function that loads the AK under the EK and leaves it loaded
    (``DeviceTpm.load_ak``: TPM2_Load and the EK's commands)."""

    def load() -> ESYS_TR:
        return tpm.load_ak(ek, ak)

    return load


class AgentQuoter:
    """Quotes with the enrolled AK after binding the payload key to PCR 16 (see the module
    docstring for the steps)."""

    def __init__(self, tpm: AttestationTpm, ak_public: bytes, load_ak: Callable[[], ESYS_TR],
                 payload_key: PayloadKey):
        self.tpm = tpm
        self.ak: PublicArea = parse_tpm2b_public(ak_public)
        self._load_ak = load_ak
        self._ak_handle: ESYS_TR | None = None
        self.payload_key = payload_key
        if self.ak.scheme not in _SIGN_ALG_NAMES or self.ak.scheme_hash not in _BANK_FIELDS:
            raise DeviceError(
                f"the AK's signing scheme {self.ak.signing_algorithm} cannot quote; expected "
                "RSASSA, RSAPSS or ECDSA with SHA-1, SHA-256, SHA-384 or SHA-512",
                code="ak-scheme-unsupported")

    @property
    def hash_bank(self) -> TpmAlg:
        """The bank that quotes select and PCR 16 is extended in: the AK's scheme hash."""
        return self.ak.scheme_hash

    @property
    def hash_alg(self) -> str:
        return bank_name(self.hash_bank)

    @property
    def sign_alg(self) -> str:
        return _SIGN_ALG_NAMES[self.ak.scheme]

    @property
    def enc_alg(self) -> str:
        return _ENC_ALG_NAMES[self.ak.type]

    def quote(self, nonce: bytes, pcrs: Iterable[int]) -> QuoteEvidence:
        """Quote ``pcrs`` and PCR 16 with ``nonce`` as qualifying data.

        Raises ValueError for a nonce longer than 64 bytes or a PCR outside 0-23, TpmError
        when a TPM command fails, and QuoteError when no attempt's quote matched its values.
        """
        if len(nonce) > MAX_QUALIFYING_DATA:
            raise ValueError(f"nonce has {len(nonce)} bytes, at most {MAX_QUALIFYING_DATA} fit")
        selected = {*pcrs, DATA_PCR}
        outside = sorted(index for index in selected if not 0 <= index < PCR_COUNT)
        if outside:
            raise ValueError(f"PCRs {outside} are outside 0-{PCR_COUNT - 1}")
        selection = single_bank_selection(self.hash_bank, selected)

        with self.tpm.lock:
            self._bind_payload_key()
            for attempt in range(1, QUOTE_ATTEMPTS + 1):
                values = self.tpm.read_pcrs(selection)
                attest, signature = self._quote_with_ak(selection, nonce)
                quoted_digest = parse_tpms_attest(attest).pcr_digest
                expected = selection_digest(self.hash_bank, selection, values)
                if hmac.compare_digest(quoted_digest, expected):
                    return QuoteEvidence(attest, signature, selection, values)
                log.info("PCR values changed between TPM2_PCR_Read and TPM2_Quote (attempt "
                         "%d of %d); quoting again", attempt, QUOTE_ATTEMPTS)
        raise QuoteError(
            f"the quote's pcrDigest differed from the PCR values read beside it on all "
            f"{QUOTE_ATTEMPTS} attempts; a PCR in {selection} changes faster than it can be "
            "quoted")

    def _bind_payload_key(self) -> None:
        """TPM2_PCR_Reset PCR 16, then TPM2_PCR_Extend it with H(payload public key PEM)."""
        self.tpm.reset_pcr(DATA_PCR)
        self.tpm.extend_pcr(DATA_PCR, {self.hash_bank: self.payload_key.pcr16_digest(self.hash_bank)})

    def _quote_with_ak(self, selection: PcrSelection, nonce: bytes) -> tuple[bytes, bytes]:
        """TPM2_Quote with the loaded AK; load it (again) when its handle is no longer loaded."""
        if self._ak_handle is None:
            self._ak_handle = self._load_ak()
        try:
            return self.tpm.quote(self._ak_handle, selection, nonce)
        except TpmError as exc:
            if not _ak_handle_gone(exc.response_code):
                raise
            log.warning("the AK handle is no longer loaded in the TPM (%s); loading the AK again",
                        exc.decoded)
        self._ak_handle = self._load_ak()
        return self.tpm.quote(self._ak_handle, selection, nonce)

    def close(self) -> None:
        """Flush the AK if it is loaded (TPM2_FlushContext)."""
        with self.tpm.lock:
            if self._ak_handle is not None:
                self.tpm.flush(self._ak_handle, "AK")
                self._ak_handle = None


def _ak_handle_gone(response_code: int) -> bool:
    """Tell whether a failed TPM2_Quote means the AK handle is no longer usable: no object is
    loaded there (a TPM-layer code), or this ESAPI context closed it (ESYS_RC_BAD_TR)."""
    if response_code == int(TSS2_RC.ESYS_RC_BAD_TR):
        return True
    if response_code > 0xFFFF:
        return False
    if response_code & 0x80:
        # Format-one code: strip the parameter flag and the handle or parameter number.
        response_code &= 0xBF
    return response_code in _HANDLE_GONE


def expected_pcr_after_extends(bank: TpmAlg, digests: Iterable[bytes],
                               initial: bytes | None = None) -> bytes:
    """Return a PCR of ``bank`` after extending ``initial`` (zeros) with each digest."""
    new_hash = hash_function(bank)
    value = bytes(digest_size(bank)) if initial is None else initial
    for digest in digests:
        value = bytes(new_hash(value + digest).digest())
    return value
