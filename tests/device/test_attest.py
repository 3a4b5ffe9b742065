"""Quote collection against swtpm: PCR reads and extends, PCR 16 and the payload key, quotes
that evidence.quote verifies, AK reloading and the retry when PCRs change mid-quote."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC

from device.attest import (
    QUOTE_ATTEMPTS,
    AgentQuoter,
    AttestationTpm,
    QuoteError,
    device_ak_loader,
    expected_pcr_after_extends,
    single_bank_selection,
)
from device.payload import load_or_create_payload_key
from device.tpm import AK_ATTRIBUTES, DeviceTpm
from evidence.quote import verify_quote
from evidence.tpm import PcrBank, PcrSelection, TpmAlg, ak_qualified_name, parse_tpm2b_public
from tests.device.agent_support import AgentKeys, create_keys
from tests.device.conftest import TpmUnderTest

pytestmark = pytest.mark.swtpm

ALL_BANKS = (TpmAlg.SHA1, TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512)


@pytest.fixture
def device(blank_swtpm: TpmUnderTest) -> Iterator[DeviceTpm]:
    with DeviceTpm.connect(blank_swtpm.tcti) as tpm:
        yield tpm


@pytest.fixture
def keys(device: DeviceTpm) -> AgentKeys:
    return create_keys(device)


def make_quoter(device: DeviceTpm, keys: AgentKeys, state_dir: Path,
                quoter_class: type[AgentQuoter] = AgentQuoter) -> AgentQuoter:
    loader = device_ak_loader(device, keys.ek, keys.ak)
    return quoter_class(AttestationTpm.for_device(device), keys.ak.public, loader,
                        load_or_create_payload_key(state_dir))


def test_allocated_banks_of_fresh_swtpm(device: DeviceTpm) -> None:
    assert AttestationTpm.for_device(device).allocated_banks() == ALL_BANKS


def test_read_pcrs_all_24(device: DeviceTpm) -> None:
    tpm = AttestationTpm.for_device(device)
    values = tpm.read_pcrs(single_bank_selection(TpmAlg.SHA256, range(24)))

    assert sorted(values[TpmAlg.SHA256]) == list(range(24))
    assert values[TpmAlg.SHA256][0] == bytes(32)
    # PCR 17-22 (dynamic root of trust) start as all ones on a PC Client TPM.
    assert values[TpmAlg.SHA256][17] == b"\xff" * 32


def test_extend_pcr_every_bank_at_once(device: DeviceTpm) -> None:
    tpm = AttestationTpm.for_device(device)
    digests = {bank: hashlib.new(bank.name.lower(), b"measured").digest() for bank in ALL_BANKS}

    tpm.extend_pcr(11, digests)

    selection = PcrSelection(tuple(PcrBank(bank, (11,)) for bank in ALL_BANKS))
    values = tpm.read_pcrs(selection)
    for bank in ALL_BANKS:
        assert values[bank][11] == expected_pcr_after_extends(bank, [digests[bank]])


def test_pcr16_resets_at_locality_zero(device: DeviceTpm) -> None:
    tpm = AttestationTpm.for_device(device)
    tpm.extend_pcr(16, {TpmAlg.SHA256: bytes(range(32))})

    tpm.reset_pcr(16)

    assert tpm.read_pcrs(single_bank_selection(TpmAlg.SHA256, [16]))[TpmAlg.SHA256][16] == bytes(32)


@pytest.mark.parametrize("ak_type", ["ecc", "rsa"])
def test_quote_verifies_with_evidence(device: DeviceTpm, tmp_path: Path, ak_type: str) -> None:
    keys = create_keys(device, ak_type=ak_type)
    quoter = make_quoter(device, keys, tmp_path)
    ak = parse_tpm2b_public(keys.ak.public)

    quote = quoter.quote(b"nonce123", [0, 10])
    result = verify_quote(ak, quote.attest, quote.signature, nonce=b"nonce123",
                          pcr_selection=quote.selection, pcr_values=quote.pcr_values,
                          ak_qualified_name=ak_qualified_name(keys.ek.public_area, ak))
    quoter.close()

    assert result.codes == []
    assert quote.selection == single_bank_selection(TpmAlg.SHA256, [0, 10, 16])
    assert quoter.hash_alg == "sha256"
    assert quoter.sign_alg == ("ecdsa" if ak_type == "ecc" else "rsassa")
    assert quoter.enc_alg == ak_type


def test_quote_binds_payload_key_to_pcr16(device: DeviceTpm, keys: AgentKeys, tmp_path: Path) -> None:
    quoter = make_quoter(device, keys, tmp_path)
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(quoter.payload_key.public_pem).digest()).digest()

    first = quoter.quote(b"a", [])
    second = quoter.quote(b"b", [])
    other_banks = AttestationTpm.for_device(device).read_pcrs(
        PcrSelection((PcrBank(TpmAlg.SHA1, (16,)), PcrBank(TpmAlg.SHA384, (16,)))))
    quoter.close()

    assert first.pcr_values[TpmAlg.SHA256][16] == expected
    assert second.pcr_values[TpmAlg.SHA256][16] == expected
    assert quoter.payload_key.expected_pcr16(TpmAlg.SHA256) == expected
    assert other_banks[TpmAlg.SHA1][16] == bytes(20)
    assert other_banks[TpmAlg.SHA384][16] == bytes(48)


def test_payload_key_kept_across_restarts(tmp_path: Path) -> None:
    first = load_or_create_payload_key(tmp_path)
    second = load_or_create_payload_key(tmp_path)

    assert first.public_pem == second.public_pem
    assert first.public_pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert (tmp_path / "payload-key.pem").stat().st_mode & 0o777 == 0o600


def test_payload_key_corrupt_file_rejected(tmp_path: Path) -> None:
    from device.payload import PayloadKeyError

    (tmp_path / "payload-key.pem").write_text("not a key")

    with pytest.raises(PayloadKeyError) as raised:
        load_or_create_payload_key(tmp_path)
    assert raised.value.code == "payload-key-invalid"


def test_quote_reloads_ak_closed_here(device: DeviceTpm, keys: AgentKeys, tmp_path: Path) -> None:
    quoter = make_quoter(device, keys, tmp_path)
    quoter.quote(b"first", [10])

    flushed = device.flush_stale_handles()
    quote = quoter.quote(b"second", [10])
    quoter.close()

    assert flushed == 1
    assert quote.selection == single_bank_selection(TpmAlg.SHA256, [10, 16])


def test_quote_reloads_flushed_ak(blank_swtpm: TpmUnderTest, device: DeviceTpm, keys: AgentKeys,
                                  tmp_path: Path) -> None:
    quoter = make_quoter(device, keys, tmp_path)
    ak = parse_tpm2b_public(keys.ak.public)
    quoter.quote(b"first", [10])

    # Another client of a TPM without a resource manager flushes every transient object.
    with DeviceTpm.connect(blank_swtpm.tcti) as other_client:
        assert other_client.transient_handles() == []
    quote = quoter.quote(b"second", [10])
    quoter.close()

    result = verify_quote(ak, quote.attest, quote.signature, nonce=b"second",
                          pcr_selection=quote.selection, pcr_values=quote.pcr_values)
    assert result.valid


class RacingTpm(AttestationTpm):
    """Extends PCR 10 right after the first ``races`` PCR reads, as the kernel's IMA may."""

    def __init__(self, base: AttestationTpm, races: int):
        super().__init__(base.esapi, base.lock)
        self.races = races
        self.reads = 0

    def read_pcrs(self, selection: PcrSelection) -> dict[TpmAlg, dict[int, bytes]]:
        values = super().read_pcrs(selection)
        self.reads += 1
        if self.reads <= self.races:
            self.extend_pcr(10, {TpmAlg.SHA256: hashlib.sha256(b"late").digest()})
        return values


def racing_quoter(device: DeviceTpm, keys: AgentKeys, tmp_path: Path, races: int) -> AgentQuoter:
    loader = device_ak_loader(device, keys.ek, keys.ak)
    tpm = RacingTpm(AttestationTpm.for_device(device), races)
    return AgentQuoter(tpm, keys.ak.public, loader, load_or_create_payload_key(tmp_path))


def test_quote_retried_when_pcr_changes(device: DeviceTpm, keys: AgentKeys, tmp_path: Path) -> None:
    quoter = racing_quoter(device, keys, tmp_path, races=2)
    ak = parse_tpm2b_public(keys.ak.public)

    quote = quoter.quote(b"racy", [10])
    quoter.close()

    assert isinstance(quoter.tpm, RacingTpm)
    assert quoter.tpm.reads == 3
    result = verify_quote(ak, quote.attest, quote.signature, nonce=b"racy",
                          pcr_selection=quote.selection, pcr_values=quote.pcr_values)
    assert result.valid


def test_quote_gives_up_after_attempts(device: DeviceTpm, keys: AgentKeys, tmp_path: Path) -> None:
    quoter = racing_quoter(device, keys, tmp_path, races=QUOTE_ATTEMPTS)

    with pytest.raises(QuoteError) as raised:
        quoter.quote(b"racy", [10])
    quoter.close()

    assert raised.value.code == "quote-pcr-mismatch"


def test_quote_rejects_long_nonce(device: DeviceTpm, keys: AgentKeys, tmp_path: Path) -> None:
    quoter = make_quoter(device, keys, tmp_path)

    with pytest.raises(ValueError, match="65 bytes"):
        quoter.quote(b"n" * 65, [10])
    quoter.close()


def test_quote_in_sha1_bank_with_sha1_ak(blank_swtpm: TpmUnderTest, tmp_path: Path) -> None:
    """An AK whose scheme hash is SHA-1 quotes the SHA-1 bank, as Keylime's hash_alg=sha1."""
    esapi = blank_swtpm.swtpm.esapi()
    template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha1:null", objectAttributes=AK_ATTRIBUTES)

    def load_primary_ak() -> ESYS_TR:
        handle: ESYS_TR = esapi.create_primary(None, template, ESYS_TR.OWNER)[0]
        return handle

    probe = load_primary_ak()
    public = bytes(esapi.read_public(probe)[0].marshal())
    esapi.flush_context(probe)
    quoter = AgentQuoter(AttestationTpm(esapi, threading.RLock()), public, load_primary_ak,
                         load_or_create_payload_key(tmp_path))

    quote = quoter.quote(b"sha1", [10])
    quoter.close()
    esapi.close()

    assert quoter.hash_alg == "sha1"
    assert quote.selection == single_bank_selection(TpmAlg.SHA1, [10, 16])
    result = verify_quote(parse_tpm2b_public(public), quote.attest, quote.signature, nonce=b"sha1",
                          pcr_selection=quote.selection, pcr_values=quote.pcr_values)
    assert result.valid


def test_quotes_serialised_across_threads(device: DeviceTpm, keys: AgentKeys, tmp_path: Path) -> None:
    quoter = make_quoter(device, keys, tmp_path)
    ak = parse_tpm2b_public(keys.ak.public)
    failures: list[BaseException] = []

    def quote_many(worker: int) -> None:
        try:
            for round_number in range(5):
                nonce = f"w{worker}r{round_number}".encode()
                quote = quoter.quote(nonce, [10])
                result = verify_quote(ak, quote.attest, quote.signature, nonce=nonce,
                                      pcr_selection=quote.selection, pcr_values=quote.pcr_values)
                assert result.valid, result.codes
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            failures.append(exc)

    threads = [threading.Thread(target=quote_many, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    quoter.close()

    assert failures == []
