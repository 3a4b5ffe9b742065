"""Hash algorithms as IMA names them, and the PCR banks a measurement list can be replayed into."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from evidence.errors import EvidenceError

# Digest sizes of every name the kernel's hash_algo_name table can write into a d-ng field.
# Older kernels call SM3 "sm3-256", newer ones "sm3".
KERNEL_DIGEST_SIZES: dict[str, int] = {
    "md4": 16,
    "md5": 16,
    "sha1": 20,
    "rmd160": 20,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "sha224": 28,
    "rmd128": 16,
    "rmd256": 32,
    "rmd320": 40,
    "wp256": 32,
    "wp384": 48,
    "wp512": 64,
    "tgr128": 16,
    "tgr160": 20,
    "tgr192": 24,
    "sm3": 32,
    "sm3-256": 32,
    "streebog256": 32,
    "streebog512": 64,
    "sha3-256": 32,
    "sha3-384": 48,
    "sha3-512": 64,
}

# The kernel writes a violation's d or d-ng field with a 20-byte zero digest whatever the
# algorithm named before it.
VIOLATION_DIGEST = bytes(20)

HashFactory = Callable[..., Any]

# PCR banks that a measurement list can be replayed into, with the hash each bank extends with.
BANK_HASHES: dict[str, HashFactory] = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}

BANK_DIGEST_SIZES: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}

# Algorithm of a template-hash column implied by its length, where the caller names none.
TEMPLATE_HASH_ALGORITHM_BY_SIZE: dict[int, str] = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}


def bank_hash(bank: str) -> HashFactory:
    """Return the hashlib constructor for PCR bank ``bank`` (``sha1``, ``sha256``, ...)."""
    try:
        return BANK_HASHES[bank]
    except KeyError:
        supported = ", ".join(BANK_HASHES)
        raise EvidenceError(
            f"PCR bank {bank!r} is not supported for IMA replay; expected one of {supported}",
            code="ima-bank-unsupported",
        ) from None


def template_hash_size_of(algorithm: str) -> int:
    """Return the size of a template-hash column computed with ``algorithm``."""
    size = BANK_DIGEST_SIZES.get(algorithm)
    if size is None:
        supported = ", ".join(BANK_DIGEST_SIZES)
        raise EvidenceError(
            f"template hash algorithm {algorithm!r} is not supported; expected one of {supported}",
            code="ima-template-hash-algorithm-unsupported",
        )
    return size


# hashlib's names for the kernel names that differ.
_HASHLIB_NAMES = {
    "rmd160": "ripemd160",
    "sm3-256": "sm3",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}


def hash_data(algorithm: str, data: bytes) -> bytes | None:
    """Hash ``data`` with the IMA-named ``algorithm``, or return None where hashlib lacks it."""
    try:
        return hashlib.new(_HASHLIB_NAMES.get(algorithm, algorithm), data).digest()
    except ValueError:
        return None
