"""Tests for evidence.credential: MakeCredential activated by a real TPM, and the file format."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.credential import (
    CREDENTIAL_FILE_MAGIC,
    kdfa,
    kdfe,
    make_credential,
    marshal_credential_file,
    parse_credential_file,
)
from evidence.errors import EvidenceError, ParseError, VerificationError
from evidence.tpm import TpmAlg, parse_tpm2b_public
from tests.support.swtpm import SwtpmProcess, TpmDevice, require_tpm2_tools

SECRET = b"0123456789abcdefghijklmnopqrstuv"


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmDevice]:
    with SwtpmProcess(tmp_path_factory.mktemp("tpm")) as tpm, TpmDevice(tpm) as dev:
        yield dev


# --- activation in swtpm with tpm2-pytss -------------------------------------------------


@pytest.mark.swtpm
@pytest.mark.parametrize("ek_template", ["EK-RSA2048", "EK-ECC256"])
@pytest.mark.parametrize("ak_kind", ["rsassa-sha256", "ecdsa-sha256"])
def test_credential_activates_in_tpm(device: TpmDevice, ek_template: str, ak_kind: str) -> None:
    ek = device.create_ek(ek_template)
    try:
        ak = device.create_ak(ek, ak_kind)
        ak_public = parse_tpm2b_public(ak.public_bytes)
        credential = make_credential(parse_tpm2b_public(ek.public_bytes), ak_public.name, SECRET)
        with device.loaded(ek, ak) as ak_handle:
            recovered = device.activate_credential(ek, ak_handle, credential)
    finally:
        device.esapi.flush_context(ek.handle)

    assert recovered == SECRET


@pytest.mark.swtpm
def test_credential_for_other_name_fails_activation(device: TpmDevice) -> None:
    from tpm2_pytss import TSS2_Exception

    ek = device.create_ek("EK-ECC256")
    try:
        ak = device.create_ak(ek, "ecdsa-sha256")
        ak_name = parse_tpm2b_public(ak.public_bytes).name
        other_name = ak_name[:2] + bytes(b ^ 0xFF for b in ak_name[2:])
        credential = make_credential(parse_tpm2b_public(ek.public_bytes), other_name, SECRET)
        with device.loaded(ek, ak) as ak_handle, pytest.raises(TSS2_Exception) as caught:
            device.activate_credential(ek, ak_handle, credential)
    finally:
        device.flush_all()

    assert "integrity" in str(caught.value).lower()


@pytest.mark.swtpm
@pytest.mark.parametrize("secret_size", [1, 20, 64])
def test_credential_secret_sizes_activate(device: TpmDevice, secret_size: int) -> None:
    secret = os.urandom(secret_size)
    ek = device.create_ek("EK-RSA2048")
    try:
        ak = device.create_ak(ek, "ecdsa-sha256")
        ak_name = parse_tpm2b_public(ak.public_bytes).name
        credential = make_credential(parse_tpm2b_public(ek.public_bytes), ak_name, secret)
        with device.loaded(ek, ak) as ak_handle:
            recovered = device.activate_credential(ek, ak_handle, credential)
    finally:
        device.esapi.flush_context(ek.handle)

    assert recovered == secret


# --- interoperability with tpm2-tools ----------------------------------------------------


@pytest.fixture
def tools_keys(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[SwtpmProcess, Path]]:
    """A fresh swtpm with ek.ctx/ek.pub and ak.ctx/ak.pub/ak.name made by tpm2-tools."""
    require_tpm2_tools()
    key_type = request.param
    with SwtpmProcess(tmp_path / "tpm") as tpm:
        tpm.run_tool("tpm2_createek", "-c", "ek.ctx", "-G", key_type, "-u", "ek.pub", cwd=tmp_path)
        tpm.run_tool(
            "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256",
            "-s", "ecdsa", "-u", "ak.pub", "-n", "ak.name", "-r", "ak.priv", cwd=tmp_path,
        )
        yield tpm, tmp_path


@pytest.mark.swtpm
@pytest.mark.parametrize("tools_keys", ["rsa", "ecc"], indirect=True)
def test_credential_file_layout_matches_tpm2_tools(tools_keys: tuple[SwtpmProcess, Path]) -> None:
    tpm, work = tools_keys
    (work / "secret.bin").write_bytes(SECRET)
    ak_name = (work / "ak.name").read_bytes()
    tpm.run_tool(
        "tpm2_makecredential", "-T", "none", "-u", "ek.pub", "-s", "secret.bin",
        "-n", ak_name.hex(), "-o", "tools.cred", cwd=work,
    )
    ek_public = parse_tpm2b_public((work / "ek.pub").read_bytes())

    ours = parse_credential_file(make_credential(ek_public, ak_name, SECRET))
    theirs = parse_credential_file((work / "tools.cred").read_bytes())

    assert len(ours.id_object) == len(theirs.id_object)
    assert len(ours.integrity_hmac) == len(theirs.integrity_hmac)
    assert len(ours.encrypted_identity) == len(theirs.encrypted_identity)
    if ek_public.type == TpmAlg.RSA:
        assert len(ours.encrypted_secret) == len(theirs.encrypted_secret)
    else:
        # An ECC secret is a TPMS_ECC_POINT. We pad each coordinate to the curve size, as a
        # TPM does; tpm2-tools drops leading zero bytes, so its coordinates may be shorter.
        curve_bytes = (ek_public.public_key.curve.key_size + 7) // 8  # type: ignore[union-attr] # ECC here
        assert _ecc_point_sizes(ours.encrypted_secret) == (curve_bytes, curve_bytes)
        theirs_x, theirs_y = _ecc_point_sizes(theirs.encrypted_secret)
        assert curve_bytes - 2 <= theirs_x <= curve_bytes
        assert curve_bytes - 2 <= theirs_y <= curve_bytes
    assert ours.encrypted_identity != theirs.encrypted_identity


def _ecc_point_sizes(encrypted_secret: bytes) -> tuple[int, int]:
    """Return the sizes of x and y in a TPMS_ECC_POINT that fills ``encrypted_secret``."""
    x_size = int.from_bytes(encrypted_secret[0:2], "big")
    y_offset = 2 + x_size
    y_size = int.from_bytes(encrypted_secret[y_offset:y_offset + 2], "big")
    assert y_offset + 2 + y_size == len(encrypted_secret)
    return x_size, y_size


@pytest.mark.swtpm
@pytest.mark.parametrize("tools_keys", ["rsa", "ecc"], indirect=True)
def test_tpm2_activatecredential_accepts_our_credential(
    tools_keys: tuple[SwtpmProcess, Path],
) -> None:
    tpm, work = tools_keys
    ek_public = parse_tpm2b_public((work / "ek.pub").read_bytes())
    ak_name = (work / "ak.name").read_bytes()
    (work / "ours.cred").write_bytes(make_credential(ek_public, ak_name, SECRET))

    tpm.run_tool("tpm2_startauthsession", "--policy-session", "-S", "session.ctx", cwd=work)
    tpm.run_tool("tpm2_policysecret", "-S", "session.ctx", "-c", "e", cwd=work)
    tpm.run_tool(
        "tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx", "-i", "ours.cred",
        "-o", "activated.bin", "-P", "session:session.ctx", cwd=work,
    )
    tpm.run_tool("tpm2_flushcontext", "session.ctx", cwd=work)

    assert (work / "activated.bin").read_bytes() == SECRET


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.swtpm
def test_make_credential_rejects_signing_ek(device: TpmDevice) -> None:
    ek = device.create_ek("EK-ECC256")
    try:
        ak = device.create_ak(ek, "ecdsa-sha256")
    finally:
        device.esapi.flush_context(ek.handle)
    ak_public = parse_tpm2b_public(ak.public_bytes)

    with pytest.raises(VerificationError, match="restricted decryption key") as caught:
        make_credential(ak_public, ak_public.name, SECRET)

    assert caught.value.code == "ek-not-storage-key"


@pytest.mark.swtpm
@pytest.mark.parametrize("secret", [b"", bytes(65)])
def test_make_credential_rejects_secret_size(device: TpmDevice, secret: bytes) -> None:
    ek = device.create_ek("EK-ECC256")
    device.esapi.flush_context(ek.handle)
    ek_public = parse_tpm2b_public(ek.public_bytes)

    with pytest.raises(ValueError, match="expected 1 to 64"):
        make_credential(ek_public, b"\x00\x0b" + bytes(32), secret)


def valid_file() -> bytes:
    id_object = struct.pack(">H", 32) + bytes(32) + bytes(34)
    return marshal_credential_file(id_object, bytes(256))


def test_credential_file_round_trip() -> None:
    parsed = parse_credential_file(valid_file())

    assert len(parsed.integrity_hmac) == 32
    assert len(parsed.encrypted_identity) == 34
    assert len(parsed.encrypted_secret) == 256
    assert marshal_credential_file(parsed.id_object, parsed.encrypted_secret) == valid_file()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xba\xdc\xc0", "structure-truncated"),
        (struct.pack(">II", 0xDEADBEEF, 1) + valid_file()[8:], "credential-file-invalid"),
        (
            struct.pack(">II", CREDENTIAL_FILE_MAGIC, 2) + valid_file()[8:],
            "credential-file-invalid",
        ),
        (valid_file()[:-1], "structure-truncated"),
        (valid_file() + b"\x00", "trailing-bytes"),
        (marshal_credential_file(bytes(2), bytes(256)), "structure-truncated"),
        (marshal_credential_file(struct.pack(">H", 65) + bytes(67), bytes(8)), "size-invalid"),
    ],
)
def test_credential_file_rejects(data: bytes, code: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_credential_file(data)

    assert caught.value.code == code


@settings(max_examples=300)
@given(data=st.binary(max_size=600))
def test_credential_file_rejects_random_bytes(data: bytes) -> None:
    try:
        parse_credential_file(struct.pack(">II", CREDENTIAL_FILE_MAGIC, 1) + data)
    except EvidenceError as error:
        assert error.code


# --- key derivation ----------------------------------------------------------------------


def test_kdfa_length_and_determinism() -> None:
    first = kdfa(TpmAlg.SHA256, b"key", b"STORAGE", b"name", b"", 128)
    second = kdfa(TpmAlg.SHA256, b"key", b"STORAGE", b"name", b"", 128)
    longer = kdfa(TpmAlg.SHA256, b"key", b"STORAGE", b"name", b"", 512)

    assert first == second
    assert len(first) == 16
    assert len(longer) == 64
    assert first != kdfa(TpmAlg.SHA256, b"key", b"INTEGRITY", b"name", b"", 128)


def test_kdfe_length() -> None:
    assert len(kdfe(TpmAlg.SHA384, b"z", b"IDENTITY", b"u", b"v", 384)) == 48
