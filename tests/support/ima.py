"""Build IMA measurement lists of our own making, for tests anywhere in the project.

The builder computes template data, template hashes and the expected PCR 10 of every bank
with its own short code written from the kernel's formats, not with ``evidence.ima``, so a
test compares two implementations. Example::

    ima = ImaListBuilder()
    ima.boot_aggregate(boot_pcrs)               # boot_pcrs: {"sha256": {0: ..., 9: ...}}
    ima.ima_ng("/usr/bin/bash", b"file content")
    ima.ima_sig("/usr/bin/env", b"content", signature=sign_file_digest(key, digest))
    text = ima.ascii()                           # or ima.binary()
    expected = ima.pcr10("sha256")               # or ima.pcr10("sha256", count=1)
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

BANK_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
DIGEST_SIZES = {**BANK_SIZES, "md5": 16, "sha224": 28, "sm3": 32}
# Index of each algorithm in the kernel's enum hash_algo, used by IMA signature headers.
HASH_ALGORITHM_IDS = {"md5": 1, "sha1": 2, "sha256": 4, "sha384": 5, "sha512": 6, "sha224": 7}

_CRYPTOGRAPHY_HASHES: dict[str, type[hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def digest_of(algorithm: str, data: bytes) -> bytes:
    return hashlib.new(algorithm, data).digest()


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


@dataclass(frozen=True)
class BuiltEntry:
    """One entry the builder made, with everything a test may want to compare against."""

    pcr: int
    template: str
    template_hash: bytes
    digest_algorithm: str
    digest: bytes
    name: bytes
    signature: bytes | None
    buffer: bytes | None
    template_data: bytes

    @property
    def violation(self) -> bool:
        return not any(self.template_hash)

    @property
    def path(self) -> str:
        return self.name.decode("utf-8", "surrogateescape")

    def ascii_line(self) -> bytes:
        """The entry's line in the ASCII form, without its newline."""
        if self.template == "ima":
            fields = self.digest.hex().encode() + b" " + self.name
        else:
            fields = f"{self.digest_algorithm}:{self.digest.hex()}".encode() + b" " + self.name
        if self.template == "ima-sig":
            fields += b" " + (self.signature or b"").hex().encode()
        if self.template == "ima-buf":
            fields += b" " + (self.buffer or b"").hex().encode()
        head = f"{self.pcr:2d} {self.template_hash.hex()} {self.template} ".encode()
        return head + fields

    def binary_record(self) -> bytes:
        """The entry's record in the binary form (little-endian)."""
        head = _u32(self.pcr) + self.template_hash + _u32(len(self.template)) + self.template.encode()
        if self.template == "ima":
            return head + self.digest + _u32(len(self.name)) + self.name
        return head + _u32(len(self.template_data)) + self.template_data


def template_data_of(
    template: str,
    digest_algorithm: str,
    digest: bytes,
    name: bytes,
    signature: bytes | None = None,
    buffer: bytes | None = None,
) -> bytes:
    """Template data as the kernel hashes it, written out field by field."""
    if template == "ima":
        return digest + name + b"\0" * (256 - len(name))
    d_ng = digest_algorithm.encode() + b":\0" + digest
    n_ng = name + b"\0"
    data = _u32(len(d_ng)) + d_ng + _u32(len(n_ng)) + n_ng
    if template == "ima-sig":
        data += _u32(len(signature or b"")) + (signature or b"")
    if template == "ima-buf":
        data += _u32(len(buffer or b"")) + (buffer or b"")
    return data


def boot_aggregate_of(bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    """SHA-1 over PCR 0-7 for the sha1 bank, the bank's hash over PCR 0-9 otherwise."""
    count = 8 if bank == "sha1" else 10
    return digest_of(bank, b"".join(pcrs[pcr] for pcr in range(count)))


def fake_boot_pcrs(seed: bytes = b"boot") -> dict[str, dict[int, bytes]]:
    """Quoted PCR 0-9 values of every bank, made up from ``seed``."""
    return {bank: {pcr: digest_of(bank, seed + bytes([pcr])) for pcr in range(10)} for bank in BANK_SIZES}


@dataclass
class ImaListBuilder:
    """Collects entries and writes them in either form, with the expected PCR 10 values."""

    template_hash_algorithm: str = "sha1"
    entries: list[BuiltEntry] = field(default_factory=list)

    def add(
        self,
        template: str,
        name: str | bytes,
        *,
        digest: bytes,
        digest_algorithm: str = "sha256",
        signature: bytes | None = None,
        buffer: bytes | None = None,
        pcr: int = 10,
        violation: bool = False,
    ) -> BuiltEntry:
        name_bytes = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        if template == "ima":
            digest_algorithm = "sha1"
        if template == "ima-sig" and signature is None:
            signature = b""
        if template == "ima-buf" and buffer is None:
            buffer = b""
        data = template_data_of(template, digest_algorithm, digest, name_bytes, signature, buffer)
        template_hash = (
            bytes(BANK_SIZES[self.template_hash_algorithm])
            if violation
            else digest_of(self.template_hash_algorithm, data)
        )
        entry = BuiltEntry(
            pcr, template, template_hash, digest_algorithm, digest, name_bytes, signature, buffer, data
        )
        self.entries.append(entry)
        return entry

    def ima_ng(
        self,
        path: str | bytes,
        content: bytes = b"",
        *,
        algorithm: str = "sha256",
        digest: bytes | None = None,
        pcr: int = 10,
    ) -> BuiltEntry:
        digest = digest if digest is not None else digest_of(algorithm, content)
        return self.add("ima-ng", path, digest=digest, digest_algorithm=algorithm, pcr=pcr)

    def ima_sig(
        self,
        path: str | bytes,
        content: bytes = b"",
        *,
        signature: bytes = b"",
        algorithm: str = "sha256",
        digest: bytes | None = None,
    ) -> BuiltEntry:
        digest = digest if digest is not None else digest_of(algorithm, content)
        return self.add("ima-sig", path, digest=digest, digest_algorithm=algorithm, signature=signature)

    def ima_buf(self, name: str, buffer: bytes, *, algorithm: str = "sha256") -> BuiltEntry:
        return self.add(
            "ima-buf",
            name,
            digest=digest_of(algorithm, buffer),
            digest_algorithm=algorithm,
            buffer=buffer,
        )

    def ima(self, path: str | bytes, content: bytes = b"") -> BuiltEntry:
        """A legacy ``ima`` template entry (SHA-1 file digest)."""
        return self.add("ima", path, digest=digest_of("sha1", content))

    def violation(self, path: str, *, template: str = "ima-ng", algorithm: str = "sha256") -> BuiltEntry:
        """A violation as the kernel logs it: zero template hash, 20-byte zero digest."""
        return self.add(template, path, digest=bytes(20), digest_algorithm=algorithm, violation=True)

    def boot_aggregate(
        self,
        pcrs: Mapping[str, Mapping[int, bytes]] | None = None,
        *,
        bank: str = "sha256",
        template: str = "ima-ng",
    ) -> BuiltEntry:
        """The first entry: the boot_aggregate of ``pcrs[bank]``, or zeros without PCRs."""
        if template == "ima":
            bank = "sha1"
        digest = boot_aggregate_of(bank, pcrs[bank]) if pcrs else bytes(BANK_SIZES[bank])
        return self.add(template, "boot_aggregate", digest=digest, digest_algorithm=bank)

    def replace_entry(self, position: int, **changes: object) -> BuiltEntry:
        """Swap in a changed copy of an entry as logged, without recomputing anything."""
        entry = replace(self.entries[position], **changes)  # type: ignore[arg-type]
        self.entries[position] = entry
        return entry

    def lines(self) -> list[bytes]:
        return [entry.ascii_line() for entry in self.entries]

    def ascii_bytes(self) -> bytes:
        return b"".join(line + b"\n" for line in self.lines())

    def ascii(self) -> str:
        return self.ascii_bytes().decode("utf-8", "surrogateescape")

    def binary(self) -> bytes:
        return b"".join(entry.binary_record() for entry in self.entries)

    def pcr10(self, bank: str, count: int | None = None) -> bytes:
        """PCR 10 of ``bank`` after the first ``count`` entries (all by default), from zeros."""
        return self.pcr10_from(bytes(BANK_SIZES[bank]), bank, 0, count)

    def pcr10_from(self, initial: bytes, bank: str, start: int, count: int | None) -> bytes:
        """PCR 10 of ``bank`` after extending ``initial`` with entries ``start .. count - 1``."""
        value = initial
        for entry in self.entries[start:count]:
            if entry.pcr != 10:
                continue
            if entry.violation:
                extend = b"\xff" * BANK_SIZES[bank]
            else:
                extend = digest_of(bank, entry.template_data)
            value = digest_of(bank, value + extend)
        return value


def ima_signature_header(
    algorithm: str, key_id: bytes, signature: bytes, *, size: int | None = None
) -> bytes:
    """``security.ima`` bytes of a version 2 signature; ``size`` overrides the size field."""
    size = len(signature) if size is None else size
    return bytes([3, 2, HASH_ALGORITHM_IDS[algorithm]]) + key_id + struct.pack(">H", size) + signature


def key_id_of(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest[-4:]


def sign_file_digest(
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    algorithm: str,
    digest: bytes,
) -> bytes:
    """Sign a file digest as evmctl does and return the ``security.ima`` bytes."""
    prehashed = Prehashed(_CRYPTOGRAPHY_HASHES[algorithm]())
    if isinstance(private_key, rsa.RSAPrivateKey):
        raw = private_key.sign(digest, padding.PKCS1v15(), prehashed)
    else:
        raw = private_key.sign(digest, ec.ECDSA(prehashed))
    return ima_signature_header(algorithm, key_id_of(private_key.public_key()), raw)
