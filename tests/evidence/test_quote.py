"""Tests for evidence.quote: quotes made by swtpm (tpm2-pytss and tpm2-tools) and the field
cases of quote verification, each with an input made here."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from evidence.errors import ParseError, VerificationError
from evidence.findings import Severity
from evidence.quote import QuoteResult, load_ak_public, negotiate_pcr_bank, verify_quote
from evidence.tpm import (
    TPM_GENERATED_VALUE,
    ClockInfo,
    PcrBank,
    PcrSelection,
    PublicArea,
    TpmAlg,
    ak_qualified_name,
    marshal_pcr_file,
    parse_pcr_file,
    parse_tpm2b_public,
    parse_tpms_attest,
)
from tests.support.swtpm import AkBlobs, EkHandle, SwtpmProcess, TpmDevice, require_tpm2_tools

pytestmark = pytest.mark.swtpm

BANKS = {"sha1": TpmAlg.SHA1, "sha256": TpmAlg.SHA256, "sha384": TpmAlg.SHA384}


@dataclass(frozen=True)
class Enrolled:
    """An AK as the registrar stores it: public area and qualified name under the EK."""

    blobs: AkBlobs
    public: PublicArea
    qualified_name: bytes


@dataclass(frozen=True)
class Quote:
    attest: bytes
    signature: bytes
    nonce: bytes
    selection: PcrSelection
    values: dict[TpmAlg, dict[int, bytes]]


class QuotingDevice:
    """A swtpm with a loaded RSA EK and AKs created on first use.

    ``aks`` reuses AKs created before a restart: the EK primary is derived from the
    endorsement seed, so it comes back the same and can load them again.
    """

    def __init__(self, tpm: SwtpmProcess, aks: dict[str, Enrolled] | None = None) -> None:
        self.tpm = tpm
        self.device = TpmDevice(tpm)
        self.ek: EkHandle = self.device.create_ek("EK-RSA2048")
        self.ek_public = parse_tpm2b_public(self.ek.public_bytes)
        self.aks: dict[str, Enrolled] = dict(aks or {})

    def close(self) -> None:
        self.device.flush_all()
        self.device.close()

    def ak(self, kind: str) -> Enrolled:
        if kind not in self.aks:
            blobs = self.device.create_ak(self.ek, kind)
            public = parse_tpm2b_public(blobs.public_bytes)
            self.aks[kind] = Enrolled(blobs, public, ak_qualified_name(self.ek_public, public))
        return self.aks[kind]

    def quote(self, kind: str, selection_text: str, nonce: bytes | None = None) -> Quote:
        """Quote, then read the PCR values as an agent sends them beside the quote."""
        nonce = os.urandom(32) if nonce is None else nonce
        with self.device.loaded(self.ek, self.ak(kind).blobs) as handle:
            attest, signature = self.device.quote(handle, selection_text, nonce)
        values = {
            BANKS[bank]: bank_values
            for bank, bank_values in self.device.pcr_read(selection_text).items()
        }
        return Quote(attest, signature, nonce, PcrSelection.from_text(selection_text), values)

    def quote_raw_selection(
        self, kind: str, selection: PcrSelection, nonce: bytes
    ) -> tuple[bytes, bytes]:
        """Quote a TPML_PCR_SELECTION given as is, which may select no PCR."""
        tpml, _ = self.device.t.TPML_PCR_SELECTION.unmarshal(selection.marshal())
        with self.device.loaded(self.ek, self.ak(kind).blobs) as handle:
            return self.device.quote(handle, tpml, nonce)

    def sign_external(self, kind: str, message: bytes) -> bytes:
        """Sign data that does not start with TPM_GENERATED_VALUE with a restricted AK.

        TPM2_Hash returns a ticket only for such data, and TPM2_Sign with a restricted key
        needs that ticket. This is how an attacker with AK access makes a signed non-quote.
        """
        t = self.device.t
        digest, ticket = self.device.esapi.hash(message, t.TPM2_ALG.SHA256, t.ESYS_TR.OWNER)
        with self.device.loaded(self.ek, self.ak(kind).blobs) as handle:
            signature = self.device.esapi.sign(
                handle, digest, t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL), ticket
            )
        return bytes(signature.marshal())

    def certify_self(self, kind: str, nonce: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify of the AK by itself: a signed TPMS_ATTEST that is not a quote."""
        t = self.device.t
        with self.device.loaded(self.ek, self.ak(kind).blobs) as handle:
            attest, signature = self.device.esapi.certify(
                handle, handle, nonce, t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL)
            )
        return bytes(attest), bytes(signature.marshal())


@pytest.fixture(scope="module")
def quoting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuotingDevice]:
    with SwtpmProcess(tmp_path_factory.mktemp("tpm")) as tpm:
        device = QuotingDevice(tpm)
        device.device.extend(10, b"boot_aggregate")
        device.device.extend(16, b"payload key")
        try:
            yield device
        finally:
            device.close()


def verify(enrolled: Enrolled, quote: Quote, **overrides: Any) -> QuoteResult:
    arguments: dict[str, Any] = {
        "nonce": quote.nonce,
        "pcr_selection": quote.selection,
        "pcr_values": quote.values,
        "ak_qualified_name": enrolled.qualified_name,
        "previous": None,
    }
    arguments.update(overrides)
    return verify_quote(enrolled.public, quote.attest, quote.signature, **arguments)


def error_codes(result: QuoteResult) -> list[str]:
    return [finding.code for finding in result.findings if finding.severity >= Severity.ERROR]


# --- quotes that verify ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ak_kind",
    [
        "rsassa-sha256", "rsapss-sha256", "ecdsa-sha256", "ecdsa-sha384",
        "rsassa-sha1", "rsassa-sha512",
    ],
)
def test_quote_verifies_each_scheme(quoting: QuotingDevice, ak_kind: str) -> None:
    quote = quoting.quote(ak_kind, "sha256:0,1,2,3,10,16")

    result = verify(quoting.ak(ak_kind), quote)

    assert result.findings == ()
    assert result.valid
    assert result.attest is not None
    assert result.attest.extra_data == quote.nonce
    assert result.next_counters == result.attest.clock_info
    assert result.pcr_values == quote.values


@pytest.mark.parametrize(
    "selection_text",
    ["sha1:0,1,2,3,4,5,6,7,10", "sha256:10", "sha1:10,16+sha256:0,1,2,3,4,5,6,7,8,9,10,16"],
)
def test_quote_verifies_sha1_sha256_banks(
    quoting: QuotingDevice, selection_text: str
) -> None:
    quote = quoting.quote("ecdsa-sha256", selection_text)

    result = verify(quoting.ak("ecdsa-sha256"), quote)

    assert result.findings == ()
    assert result.pcr_values == quote.values


def test_quote_verifies_from_pcr_file(quoting: QuotingDevice) -> None:
    quote = quoting.quote("rsassa-sha256", "sha1:16+sha256:0,1,2,3,4,5,6,7,10")
    pcr_file = parse_pcr_file(marshal_pcr_file(quote.selection, quote.values))

    result = verify(quoting.ak("rsassa-sha256"), quote, pcr_values=pcr_file.values)

    assert result.valid


def test_quote_verifies_with_cached_ak(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("ecdsa-sha256")
    quote = quoting.quote("ecdsa-sha256", "sha256:10")

    first = load_ak_public(enrolled.blobs.public_bytes)
    second = load_ak_public(enrolled.blobs.public_bytes)

    assert first is second
    assert verify_quote(
        first, quote.attest, quote.signature, nonce=quote.nonce,
        pcr_selection=quote.selection, pcr_values=quote.values,
    ).valid


def test_quote_bare_key_skips_signer(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("ecdsa-sha256")
    quote = quoting.quote("ecdsa-sha256", "sha256:10")

    result = verify_quote(
        enrolled.public.public_key, quote.attest, quote.signature, nonce=quote.nonce,
        pcr_selection=quote.selection, pcr_values=quote.values,
    )

    assert result.valid
    assert result.codes == ["quote-qualified-signer-not-checked"]
    assert "bare public key" in result.findings[0].message


# --- PCR values read after the quote -----------------------------------------------------


def test_quote_rejects_late_pcr_values(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("ecdsa-sha256")
    nonce = os.urandom(32)
    with quoting.device.loaded(quoting.ek, enrolled.blobs) as handle:
        attest, signature = quoting.device.quote(handle, "sha256:10,16", nonce)
    quoting.device.extend(10, b"measured after the quote")
    later_values = {TpmAlg.SHA256: quoting.device.pcr_read("sha256:10,16")["sha256"]}
    quote = Quote(attest, signature, nonce, PcrSelection.from_text("sha256:10,16"), later_values)

    result = verify(enrolled, quote)

    assert error_codes(result) == ["quote-pcr-digest-mismatch"]
    assert result.pcr_values == {}
    assert result.next_counters is None


def test_quote_rejects_one_changed_pcr_value(quoting: QuotingDevice) -> None:
    quote = quoting.quote("rsassa-sha256", "sha1:0,1+sha256:0,1,10")
    values = {bank: dict(bank_values) for bank, bank_values in quote.values.items()}
    values[TpmAlg.SHA1][1] = b"\x01" * 20

    result = verify(quoting.ak("rsassa-sha256"), quote, pcr_values=values)

    assert error_codes(result) == ["quote-pcr-digest-mismatch"]
    assert "pcrDigest" in result.findings[0].message


def test_quote_rejects_missing_pcr_value(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:0,10")
    values = {TpmAlg.SHA256: {10: quote.values[TpmAlg.SHA256][10]}}

    result = verify(quoting.ak("ecdsa-sha256"), quote, pcr_values=values)

    assert error_codes(result) == ["quote-pcr-values-missing"]
    assert "sha256:0" in result.findings[0].message


def test_quote_rejects_shifted_pcr_values(quoting: QuotingDevice) -> None:
    """Values whose concatenation hashes right but whose boundaries moved are rejected."""
    quote = quoting.quote("ecdsa-sha256", "sha256:0,10")
    first, second = quote.values[TpmAlg.SHA256][0], quote.values[TpmAlg.SHA256][10]
    shifted = {TpmAlg.SHA256: {0: first + second[:1], 10: second[1:]}}

    result = verify(quoting.ak("ecdsa-sha256"), quote, pcr_values=shifted)

    assert error_codes(result) == ["quote-pcr-values-invalid"]


def test_quote_accepts_values_in_any_order(quoting: QuotingDevice) -> None:
    """Reordered values, or values with PCRs the quote leaves out, give the same result."""
    quote = quoting.quote("rsassa-sha256", "sha1:16+sha256:0,1,10")
    reordered = {
        bank: dict(reversed(list(bank_values.items())))
        for bank, bank_values in quote.values.items()
    }
    extended: dict[TpmAlg, dict[int, bytes]] = {}
    for bank, bank_values in quote.values.items():
        digest_size = len(next(iter(bank_values.values())))
        extended[bank] = {**bank_values, 23: bytes(digest_size)}
    exact = verify(quoting.ak("rsassa-sha256"), quote)

    assert exact.findings == ()
    for values in (reordered, extended):
        result = verify(quoting.ak("rsassa-sha256"), quote, pcr_values=values)
        assert result.findings == exact.findings
        assert result.pcr_values == quote.values
        for bank in quote.selection.banks:
            assert tuple(result.pcr_values[bank.hash_alg]) == bank.pcrs


def test_quote_rejects_shifted_values_any_order(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:0,10")
    first, second = quote.values[TpmAlg.SHA256][0], quote.values[TpmAlg.SHA256][10]
    in_order = {TpmAlg.SHA256: {0: first + second[:1], 10: second[1:]}}
    reversed_order = {TpmAlg.SHA256: {10: second[1:], 0: first + second[:1]}}

    results = [
        verify(quoting.ak("ecdsa-sha256"), quote, pcr_values=values)
        for values in (in_order, reversed_order)
    ]

    assert results[0].findings == results[1].findings
    assert error_codes(results[0]) == ["quote-pcr-values-invalid"]
    assert results[0].findings[0].message == "PCR values: sha256:0 has 33 bytes, expected 32"


def test_quote_result_equals_constructed_result(quoting: QuotingDevice) -> None:
    quote = quoting.quote("rsassa-sha256", "sha256:0,10")

    result = verify(quoting.ak("rsassa-sha256"), quote)

    assert result.attest is not None
    assert result == QuoteResult(
        findings=(), attest=result.attest, next_counters=result.attest.clock_info,
        pcr_values=quote.values, new_boot_session=False,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.findings = ()  # type: ignore[misc]  # assigning to a frozen field is the test


# --- missing or empty PCR bank -----------------------------------------------------------


def test_quote_rejects_bank_selected_without_pcrs(quoting: QuotingDevice) -> None:
    """The SHA-1 bank is named but selects no PCR, so pcrDigest is the hash of nothing."""
    nonce = os.urandom(32)
    empty_bank = PcrSelection((PcrBank(TpmAlg.SHA1, ()),))
    attest, signature = quoting.quote_raw_selection("ecdsa-sha256", empty_bank, nonce)

    result = verify_quote(
        quoting.ak("ecdsa-sha256").public, attest, signature, nonce=nonce,
        pcr_selection=empty_bank, pcr_values={},
    )

    assert parse_tpms_attest(attest).pcr_digest == hashlib.sha256(b"").digest()
    assert error_codes(result) == ["quote-pcr-selection-empty"]
    assert not result.valid


def test_quote_rejects_selection_without_banks(quoting: QuotingDevice) -> None:
    nonce = os.urandom(32)
    attest, signature = quoting.quote_raw_selection("ecdsa-sha256", PcrSelection(()), nonce)

    result = verify_quote(
        quoting.ak("ecdsa-sha256").public, attest, signature, nonce=nonce,
        pcr_selection=PcrSelection.from_text("sha256:10"), pcr_values={},
    )

    assert error_codes(result) == ["quote-pcr-selection-empty"]


def test_quote_rejects_bank_the_tpm_lacks(tmp_path: Path) -> None:
    """A TPM with only a SHA-1 bank returns an empty selection for a SHA-256 request."""
    with SwtpmProcess(tmp_path / "sha1-only") as tpm:
        with TpmDevice(tpm) as device:
            sha1_only = PcrSelection(
                (PcrBank(TpmAlg.SHA1, tuple(range(24))), PcrBank(TpmAlg.SHA256, ()),
                 PcrBank(TpmAlg.SHA384, ()), PcrBank(TpmAlg.SHA512, ()))
            )
            tpml, _ = device.t.TPML_PCR_SELECTION.unmarshal(sha1_only.marshal())
            device.esapi.pcr_allocate(tpml)
        tpm.restart()
        quoting = QuotingDevice(tpm)
        try:
            quote = quoting.quote("ecdsa-sha256", "sha1:10")
            nonce = os.urandom(32)
            with quoting.device.loaded(quoting.ek, quoting.ak("ecdsa-sha256").blobs) as handle:
                attest, signature = quoting.device.quote(handle, "sha256:0,1,10", nonce)
            enrolled = quoting.ak("ecdsa-sha256")
        finally:
            quoting.close()

    result = verify_quote(
        enrolled.public, attest, signature, nonce=nonce,
        pcr_selection=PcrSelection.from_text("sha256:0,1,10"), pcr_values={},
        ak_qualified_name=enrolled.qualified_name,
    )
    sha1_result = verify(enrolled, quote)

    assert str(parse_tpms_attest(attest).pcr_selection) == "sha256:"
    assert error_codes(result) == ["quote-pcr-selection-empty"]
    assert sha1_result.valid


def test_negotiate_pcr_bank_prefers_sha256() -> None:
    assert negotiate_pcr_bank([TpmAlg.SHA1, TpmAlg.SHA256]) == TpmAlg.SHA256
    assert negotiate_pcr_bank([TpmAlg.SHA1]) == TpmAlg.SHA1


def test_negotiate_pcr_bank_rejects_none() -> None:
    with pytest.raises(VerificationError, match="no PCR bank in common") as caught:
        negotiate_pcr_bank([], preferred=[TpmAlg.SHA256])

    assert caught.value.code == "pcr-bank-unavailable"


def test_quote_rejects_other_selection(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:0,10")

    result = verify(
        quoting.ak("ecdsa-sha256"), quote, pcr_selection=PcrSelection.from_text("sha256:0,10,16")
    )

    assert error_codes(result) == ["quote-pcr-selection-mismatch"]
    assert "expected the requested sha256:0,10,16" in result.findings[0].message


# --- foreign key -------------------------------------------------------------------------


def test_quote_rejects_software_key_signature(quoting: QuotingDevice) -> None:
    quote = quoting.quote("rsassa-sha256", "sha256:10")
    software_key = rsa.generate_private_key(65537, 2048)
    forged = software_key.sign(quote.attest, padding.PKCS1v15(), hashes.SHA256())
    forged_signature = struct.pack(">HHH", TpmAlg.RSASSA, TpmAlg.SHA256, len(forged)) + forged
    forged_quote = Quote(quote.attest, forged_signature, quote.nonce, quote.selection, quote.values)

    result = verify(quoting.ak("rsassa-sha256"), forged_quote)

    assert error_codes(result) == ["quote-signature-invalid"]
    assert result.attest is None
    assert result.pcr_values == {}


def test_quote_rejects_ak_of_other_scheme(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha384", "sha256:10")
    other = quoting.ak("ecdsa-sha256")

    result = verify(other, quote)

    assert error_codes(result) == ["quote-signature-algorithm-mismatch"]


def test_quote_rejects_same_scheme_other_ak(quoting: QuotingDevice) -> None:
    quote = quoting.quote("rsassa-sha256", "sha256:10")
    second = quoting.device.create_ak(quoting.ek, "rsassa-sha256")
    second_public = parse_tpm2b_public(second.public_bytes)
    enrolled = Enrolled(second, second_public, ak_qualified_name(quoting.ek_public, second_public))

    result = verify(enrolled, quote)

    assert error_codes(result) == ["quote-signature-invalid"]


def test_quote_rejects_rsapss_signature_for_rsassa_ak(quoting: QuotingDevice) -> None:
    quote = quoting.quote("rsapss-sha256", "sha256:10")

    result = verify(quoting.ak("rsassa-sha256"), quote)

    assert error_codes(result) == ["quote-signature-algorithm-mismatch"]
    assert "RSAPSS-SHA256" in result.findings[0].message


# --- replay and nonce --------------------------------------------------------------------


def test_quote_rejects_other_nonce(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:10")

    result = verify(quoting.ak("ecdsa-sha256"), quote, nonce=os.urandom(32))

    assert error_codes(result) == ["quote-nonce-mismatch"]
    assert result.next_counters is None


def test_quote_rejects_nonce_prefix(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:10")

    result = verify(quoting.ak("ecdsa-sha256"), quote, nonce=quote.nonce[:-1])

    assert error_codes(result) == ["quote-nonce-mismatch"]


def test_quote_rejects_reused_quote(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("ecdsa-sha256")
    quote = quoting.quote("ecdsa-sha256", "sha256:10")
    first = verify(enrolled, quote)

    again_same_nonce = verify(enrolled, quote, previous=first.next_counters)
    again_new_nonce = verify(
        enrolled, quote, nonce=os.urandom(32), previous=first.next_counters
    )

    assert first.valid
    assert error_codes(again_same_nonce) == ["quote-replayed"]
    assert error_codes(again_new_nonce) == ["quote-nonce-mismatch", "quote-replayed"]


def test_quote_accepts_next_quote_of_session(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("ecdsa-sha256")
    first = verify(enrolled, quoting.quote("ecdsa-sha256", "sha256:10"))
    quoting.device.extend(23, b"let the clock move")

    second = verify(
        enrolled, quoting.quote("ecdsa-sha256", "sha256:10"), previous=first.next_counters
    )

    assert second.findings == ()
    assert second.next_counters is not None
    assert first.next_counters is not None
    assert second.next_counters.clock >= first.next_counters.clock


# --- counters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"reset_count": 1}, "resetCount"),
        ({"restart_count": 1}, "restartCount"),
        ({"clock": 60_000}, "clock"),
    ],
)
def test_quote_rejects_counters_backwards(
    quoting: QuotingDevice, change: dict[str, int], field: str
) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:10")
    current = parse_tpms_attest(quote.attest).clock_info
    later = {name: getattr(current, name) + delta for name, delta in change.items()}
    previous = current._replace(**later)

    result = verify(quoting.ak("ecdsa-sha256"), quote, previous=previous)

    assert error_codes(result) == ["quote-counter-regressed"]
    assert f"{field} went back" in result.findings[0].message
    assert result.next_counters == previous


@pytest.mark.parametrize(
    ("orderly", "expected_codes"),
    [
        (True, ["quote-new-boot-session"]),
        (False, ["quote-new-boot-session", "quote-clock-not-safe"]),
    ],
)
def test_quote_reboot_starts_new_session(
    tmp_path: Path, orderly: bool, expected_codes: list[str]
) -> None:
    """swtpm restarted on the same state is a reboot: resetCount grows, clock may go back.

    Without TPM2_Shutdown first, the TPM reports clockInfo.safe = NO afterwards.
    """
    with SwtpmProcess(tmp_path / "device") as tpm:
        device = QuotingDevice(tpm)
        try:
            enrolled = device.ak("ecdsa-sha256")
            before = device.quote("ecdsa-sha256", "sha256:10")
            if orderly:
                device.device.esapi.shutdown(device.device.t.TPM2_SU.CLEAR)
        finally:
            device.close()
        tpm.restart(orderly=orderly)
        device = QuotingDevice(tpm, aks={"ecdsa-sha256": enrolled})
        try:
            after = device.quote("ecdsa-sha256", "sha256:10")
        finally:
            device.close()
    first = verify(enrolled, before)
    assert first.next_counters is not None
    previous_with_later_clock = first.next_counters._replace(
        clock=first.next_counters.clock + 10**9
    )

    result = verify(enrolled, after, previous=previous_with_later_clock)

    assert result.valid
    assert result.codes == expected_codes
    assert result.new_boot_session
    assert result.next_counters is not None
    assert result.next_counters.reset_count == first.next_counters.reset_count + 1


# --- qualified signer --------------------------------------------------------------------


def test_quote_qualified_signer_is_qualified_name(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("rsassa-sha256")
    quote = quoting.quote("rsassa-sha256", "sha256:10")

    attest = parse_tpms_attest(quote.attest)

    assert attest.qualified_signer == enrolled.qualified_name
    assert attest.qualified_signer != enrolled.public.name


def test_quote_rejects_plain_name_signer(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("rsassa-sha256")
    quote = quoting.quote("rsassa-sha256", "sha256:10")

    result = verify(enrolled, quote, ak_qualified_name=enrolled.public.name)

    assert error_codes(result) == ["quote-qualified-signer-mismatch"]


def test_quote_rejects_ak_under_other_ek(quoting: QuotingDevice) -> None:
    enrolled = quoting.ak("rsassa-sha256")
    quote = quoting.quote("rsassa-sha256", "sha256:10")
    ecc_ek = quoting.device.create_ek("EK-ECC256")
    quoting.device.esapi.flush_context(ecc_ek.handle)
    other_ek_public = parse_tpm2b_public(ecc_ek.public_bytes)
    other_qualified_name = ak_qualified_name(other_ek_public, enrolled.public)

    result = verify(enrolled, quote, ak_qualified_name=other_qualified_name)

    assert error_codes(result) == ["quote-qualified-signer-mismatch"]


def test_quote_without_qualified_name_warns(quoting: QuotingDevice) -> None:
    quote = quoting.quote("rsassa-sha256", "sha256:10")

    result = verify(quoting.ak("rsassa-sha256"), quote, ak_qualified_name=None)

    assert result.valid
    assert result.codes == ["quote-qualified-signer-not-checked"]
    assert result.findings[0].severity == Severity.WARNING


# --- magic, type, malformed --------------------------------------------------------------


def test_quote_rejects_signed_non_quote(quoting: QuotingDevice) -> None:
    """A restricted AK signs external data only when it lacks TPM_GENERATED_VALUE."""
    genuine = quoting.quote("ecdsa-sha256", "sha256:10")
    fake_attest = struct.pack(">I", 0x00544347) + genuine.attest[4:]
    signature = quoting.sign_external("ecdsa-sha256", fake_attest)
    fake = Quote(fake_attest, signature, genuine.nonce, genuine.selection, genuine.values)

    result = verify(quoting.ak("ecdsa-sha256"), fake)

    assert error_codes(result) == ["quote-magic-invalid"]
    assert f"expected 0x{TPM_GENERATED_VALUE:08x}" in result.findings[0].message


def test_quote_rejects_signed_garbage(quoting: QuotingDevice) -> None:
    garbage = b"\x00\x00\x00\x00\x80\x18" + b"\xff" * 10
    signature = quoting.sign_external("ecdsa-sha256", garbage)

    result = verify_quote(
        quoting.ak("ecdsa-sha256").public, garbage, signature, nonce=b"n",
        pcr_selection=None, pcr_values=None,
    )

    assert error_codes(result) == ["quote-magic-invalid", "quote-attest-malformed"]


@pytest.mark.parametrize(
    ("data", "magic", "attest_type"),
    [(b"\x00ab", "0x00006162", "0x0000"), (b"\x00\x00\x00\x00\x80", "0x00000000", "0x0080")],
)
def test_quote_rejects_short_signed_data(
    quoting: QuotingDevice, data: bytes, magic: str, attest_type: str
) -> None:
    """Data shorter than magic and type is read as far as it goes."""
    signature = quoting.sign_external("ecdsa-sha256", data)

    result = verify_quote(
        quoting.ak("ecdsa-sha256").public, data, signature, nonce=b"n",
        pcr_selection=None, pcr_values=None,
    )

    assert error_codes(result) == ["quote-magic-invalid", "quote-type-invalid"]
    assert f"got {magic}," in result.findings[0].message
    assert f"got {attest_type}," in result.findings[1].message


def test_quote_rejects_certify_attestation(quoting: QuotingDevice) -> None:
    nonce = os.urandom(32)
    attest, signature = quoting.certify_self("ecdsa-sha256", nonce)

    result = verify_quote(
        quoting.ak("ecdsa-sha256").public, attest, signature, nonce=nonce,
        pcr_selection=PcrSelection.from_text("sha256:10"), pcr_values={},
    )

    assert error_codes(result) == ["quote-type-invalid"]
    assert "0x8017" in result.findings[0].message


def test_quote_rejects_malformed_signature(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:10")

    result = verify(
        quoting.ak("ecdsa-sha256"), Quote(quote.attest, quote.signature[:-3], quote.nonce,
                                           quote.selection, quote.values)
    )

    assert error_codes(result) == ["quote-signature-malformed"]


def test_quote_clock_not_safe_warns() -> None:
    """A quote with safe = NO, signed by a software key given as a bare public key."""
    key = ec.generate_private_key(ec.SECP256R1())
    selection = PcrSelection.from_text("sha256:10")
    value = hashlib.sha256(b"pcr").digest()
    attest = (
        struct.pack(">IHH", TPM_GENERATED_VALUE, 0x8018, 0)
        + struct.pack(">H", 5) + b"nonce"
        + struct.pack(">QIIBQ", 5000, 1, 0, 0, 1)
        + selection.marshal()
        + struct.pack(">H", 32) + hashlib.sha256(value).digest()
    )
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(key.sign(attest, ec.ECDSA(hashes.SHA256())))
    signature = (
        struct.pack(">HH", TpmAlg.ECDSA, TpmAlg.SHA256)
        + struct.pack(">H", 32) + r.to_bytes(32, "big")
        + struct.pack(">H", 32) + s.to_bytes(32, "big")
    )

    result = verify_quote(
        key.public_key(), attest, signature, nonce=b"nonce", pcr_selection=selection,
        pcr_values={TpmAlg.SHA256: {10: value}},
    )

    assert result.valid
    assert "quote-clock-not-safe" in result.codes
    assert error_codes(result) == []


def test_quote_without_nonce_or_values_warns(quoting: QuotingDevice) -> None:
    quote = quoting.quote("ecdsa-sha256", "sha256:10")

    result = verify(
        quoting.ak("ecdsa-sha256"), quote, nonce=None, pcr_selection=None, pcr_values=None
    )

    assert result.valid
    assert result.codes == [
        "quote-nonce-not-checked", "quote-pcr-selection-not-checked", "quote-pcr-digest-not-checked"
    ]


# --- flipped bits ------------------------------------------------------------------------


def flipped(data: bytes) -> Iterator[tuple[int, bytes]]:
    for position in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[position // 8] ^= 1 << (position % 8)
        yield position, bytes(mutated)


@pytest.mark.parametrize("ak_kind", ["rsassa-sha256", "ecdsa-sha256"])
def test_quote_catches_attest_bit_flips(quoting: QuotingDevice, ak_kind: str) -> None:
    quote = quoting.quote(ak_kind, "sha1:10+sha256:0,10")
    enrolled = quoting.ak(ak_kind)

    for position, attest in flipped(quote.attest):
        result = verify(enrolled, Quote(attest, quote.signature, quote.nonce, quote.selection,
                                        quote.values))
        assert error_codes(result) == ["quote-signature-invalid"], position


@pytest.mark.parametrize("ak_kind", ["rsapss-sha256", "ecdsa-sha256"])
def test_quote_catches_signature_bit_flips(
    quoting: QuotingDevice, ak_kind: str
) -> None:
    quote = quoting.quote(ak_kind, "sha256:10")
    enrolled = quoting.ak(ak_kind)

    for position, signature in flipped(quote.signature):
        result = verify(enrolled, Quote(quote.attest, signature, quote.nonce, quote.selection,
                                        quote.values))
        assert not result.valid, position
        assert result.attest is None, position


def test_quote_catches_pcr_file_bit_flips(quoting: QuotingDevice) -> None:
    """A flip either fails the quote, or lands in padding or unused slots and changes nothing."""
    quote = quoting.quote("rsassa-sha256", "sha1:10+sha256:0,1,2,3,4,5,6,7,10")
    enrolled = quoting.ak("rsassa-sha256")
    pcr_file = marshal_pcr_file(quote.selection, quote.values)
    harmless = 0

    for position, data in flipped(pcr_file):
        try:
            parsed = parse_pcr_file(data)
        except ParseError:
            continue
        result = verify(enrolled, quote, pcr_values=parsed.values)
        if result.valid:
            assert parsed.values == quote.values, position
            harmless += 1

    assert harmless > 0


# --- tpm2-tools quote --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools_quote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A quote made by tpm2_quote over sha256:0,1,2,3,10,16 with an RSA AK under an RSA EK."""
    require_tpm2_tools()
    work = tmp_path_factory.mktemp("tools-quote")
    with SwtpmProcess(work / "tpm") as tpm:
        tpm.run_tool("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub", cwd=work)
        tpm.run_tool(
            "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256",
            "-s", "rsassa", "-u", "ak.pub", "-n", "ak.name", "-r", "ak.priv", cwd=work,
        )
        tpm.run_tool("tpm2_pcrextend", f"10:sha256={hashlib.sha256(b'm').hexdigest()}", cwd=work)
        nonce = os.urandom(32).hex()
        (work / "nonce.hex").write_text(nonce)
        tpm.run_tool(
            "tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,1,2,3,10,16", "-q", nonce,
            "-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs", "-g", "sha256", cwd=work,
        )
    yield work


def checkquote(work: Path, pcr_file: str = "quote.pcrs", nonce: str | None = None) -> int:
    nonce = nonce or (work / "nonce.hex").read_text()
    return subprocess.run(
        ["tpm2_checkquote", "-u", "ak.pub", "-m", "quote.msg", "-s", "quote.sig",
         "-f", pcr_file, "-g", "sha256", "-q", nonce],
        cwd=work, capture_output=True, timeout=60, check=False,
    ).returncode


def test_tpm2_tools_quote_verifies(tools_quote: Path) -> None:
    ek_public = parse_tpm2b_public((tools_quote / "ek.pub").read_bytes())
    ak_public = parse_tpm2b_public((tools_quote / "ak.pub").read_bytes())
    pcr_file = parse_pcr_file((tools_quote / "quote.pcrs").read_bytes())

    result = verify_quote(
        ak_public,
        (tools_quote / "quote.msg").read_bytes(),
        (tools_quote / "quote.sig").read_bytes(),
        nonce=bytes.fromhex((tools_quote / "nonce.hex").read_text()),
        pcr_selection=PcrSelection.from_text("sha256:0,1,2,3,10,16"),
        pcr_values=pcr_file.values,
        ak_qualified_name=ak_qualified_name(ek_public, ak_public),
    )

    assert result.findings == ()
    assert checkquote(tools_quote) == 0
    assert pcr_file.values[TpmAlg.SHA256][10] == hashlib.sha256(
        bytes(32) + hashlib.sha256(b"m").digest()
    ).digest()


def test_tpm2_tools_pcr_file_equals_ours(tools_quote: Path) -> None:
    data = (tools_quote / "quote.pcrs").read_bytes()
    parsed = parse_pcr_file(data)

    assert marshal_pcr_file(parsed.selection, parsed.values) == data


def test_tampered_tools_quote_rejected_by_both(tools_quote: Path) -> None:
    ak_public = parse_tpm2b_public((tools_quote / "ak.pub").read_bytes())
    parsed = parse_pcr_file((tools_quote / "quote.pcrs").read_bytes())
    values = {TpmAlg.SHA256: dict(parsed.values[TpmAlg.SHA256])}
    values[TpmAlg.SHA256][16] = b"\x01" * 32
    (tools_quote / "tampered.pcrs").write_bytes(marshal_pcr_file(parsed.selection, values))

    result = verify_quote(
        ak_public,
        (tools_quote / "quote.msg").read_bytes(),
        (tools_quote / "quote.sig").read_bytes(),
        nonce=bytes.fromhex((tools_quote / "nonce.hex").read_text()),
        pcr_selection=parsed.selection,
        pcr_values=values,
    )

    assert error_codes(result) == ["quote-pcr-digest-mismatch"]
    assert checkquote(tools_quote, pcr_file="tampered.pcrs") != 0
    assert checkquote(tools_quote, nonce="00ff") != 0


def test_counters_survive_as_clock_info(quoting: QuotingDevice) -> None:
    result = verify(quoting.ak("ecdsa-sha256"), quoting.quote("ecdsa-sha256", "sha256:10"))

    assert isinstance(result.next_counters, ClockInfo)
