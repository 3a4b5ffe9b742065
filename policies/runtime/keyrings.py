"""Keys learned from ``ima-buf`` keyring entries: the only state runtime policy evaluation keeps.

When the kernel loads a key into a keyring that IMA measures (``.ima``, ``.builtin_trusted_keys``
and so on), it logs an ``ima-buf`` entry named after the keyring whose buffer is the DER
certificate. A key whose digest the policy lists under ``keyrings[<name>]`` is learned and
verifies the signatures of later ``ima-sig`` entries. Evaluation is otherwise per entry, so a
verifier that evaluates only the new entries of a list stores this state between attestations
and drops it when the device reboots.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policies.errors import POLICY_FIELD_INVALID, PolicyError
from policies.imasig import VerificationKey, load_verification_key

KEYRING_STATE_VERSION = 1


@dataclass(frozen=True)
class LearnedKey:
    """A key measured into ``keyring`` whose digest the runtime policy allows."""

    keyring: str
    key: VerificationKey


@dataclass(frozen=True)
class KeyringState:
    """The keys learned so far in one boot of a device, oldest first, without duplicates."""

    keys: tuple[LearnedKey, ...] = ()

    def with_keys(self, learned: Iterable[LearnedKey]) -> KeyringState:
        """Return the state with ``learned`` added, skipping keys already held."""
        seen = {_identity(item) for item in self.keys}
        keys = list(self.keys)
        for item in learned:
            identity = _identity(item)
            if identity not in seen:
                seen.add(identity)
                keys.append(item)
        return KeyringState(tuple(keys))

    def to_json(self) -> dict[str, Any]:
        """Return the state as a JSON-ready object for the verifier's database."""
        return {
            "version": KEYRING_STATE_VERSION,
            "keys": [
                {
                    "keyring": item.keyring,
                    "key_id": item.key.key_id,
                    "public_key": base64.b64encode(item.key.spki_der()).decode("ascii"),
                }
                for item in self.keys
            ],
        }

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> KeyringState:
        """Rebuild a state from ``to_json`` output. Raises PolicyError if it is malformed."""
        if stored.get("version") != KEYRING_STATE_VERSION or not isinstance(stored.get("keys"), list):
            raise PolicyError(
                f"learned keyring state must be an object with version {KEYRING_STATE_VERSION} "
                "and a keys array",
                code=POLICY_FIELD_INVALID,
                field="keys",
            )
        keys = []
        for index, item in enumerate(stored["keys"]):
            field = f"keys[{index}]"
            try:
                keyring = item["keyring"]
                key_id = item["key_id"]
                der = base64.b64decode(item["public_key"], validate=True)
            except (KeyError, TypeError, binascii.Error) as exc:
                raise PolicyError(
                    f"learned key is malformed: {exc}", code=POLICY_FIELD_INVALID, field=field
                ) from None
            if not isinstance(keyring, str) or type(key_id) is not int:
                raise PolicyError(
                    "learned key needs a string keyring and an integer key_id",
                    code=POLICY_FIELD_INVALID,
                    field=field,
                )
            keys.append(LearnedKey(keyring, load_verification_key(der, key_id=key_id)))
        return cls(tuple(keys))


EMPTY_KEYRING_STATE = KeyringState()


def _identity(item: LearnedKey) -> tuple[str, int, bytes]:
    return item.keyring, item.key.key_id, item.key.spki_der()
