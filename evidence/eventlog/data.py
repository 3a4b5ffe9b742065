"""Typed event data: the layouts that the TCG PC Client Platform Firmware Profile (PFP) and the
UEFI specification define for the data of an event.

Each class is frozen and has ``to_json()`` for ``edgetrust evidence eventlog --json``. Event
data that has none of these layouts stays raw bytes on the event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from cryptography import x509

from evidence.errors import ParseError
from evidence.eventlog.types import EFI_CERT_SHA256_GUID, EFI_CERT_X509_GUID, HashAlgorithm


@dataclass(frozen=True, slots=True)
class SpecIdEvent:
    """TCG_EfiSpecIDEvent: the header of a crypto-agile log, naming its hash algorithms."""

    signature: str
    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[HashAlgorithm, ...]
    vendor_info: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "spec_id",
            "signature": self.signature,
            "platform_class": self.platform_class,
            "spec_version": f"{self.spec_version_major}.{self.spec_version_minor}",
            "spec_errata": self.spec_errata,
            "uintn_size": self.uintn_size,
            "algorithms": [
                {"alg_id": a.alg_id, "name": a.name, "digest_size": a.digest_size}
                for a in self.algorithms
            ],
            "vendor_info": self.vendor_info.hex(),
        }


@dataclass(frozen=True, slots=True)
class StartupLocality:
    """The ``EV_NO_ACTION`` event that records the locality of TPM2_Startup. PCR 0 starts
    with this value in its last byte instead of 0."""

    locality: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": "startup_locality", "locality": self.locality}


@dataclass(frozen=True, slots=True)
class Text:
    """Event data that is a string: ``EV_EFI_ACTION``, ``EV_ACTION``, an ``EV_POST_CODE``
    description, an ``EV_S_CRTM_VERSION`` (UTF-16) and the like."""

    text: str
    encoding: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": "text", "text": self.text, "encoding": self.encoding}


@dataclass(frozen=True, slots=True)
class IplText:
    """``EV_IPL`` data that is a string.

    GRUB writes ``<label>: <value>`` in ASCII with a trailing NUL in PCR 8 (labels
    ``kernel_cmdline``, ``grub_cmd``, ``module_cmdline``) and file names in PCR 9. Shim writes
    variable names such as ``MokList`` in PCR 14. systemd-boot writes the kernel command line
    in UTF-16LE in PCR 12 (older releases: PCR 8). ``label`` is None unless the text has the
    GRUB form.
    """

    text: str
    encoding: str
    label: str | None
    value: str

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "ipl_text",
            "text": self.text,
            "encoding": self.encoding,
            "label": self.label,
            "value": self.value,
        }


@dataclass(frozen=True, slots=True)
class GuidData:
    """Event data that is one GUID (some firmware logs its S-CRTM version as a GUID)."""

    guid: UUID

    def to_json(self) -> dict[str, Any]:
        return {"kind": "guid", "guid": str(self.guid)}


@dataclass(frozen=True, slots=True)
class Separator:
    """``EV_SEPARATOR`` data: 0 normally, 1 when firmware met an error (PFP)."""

    value: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": "separator", "value": self.value}


@dataclass(frozen=True, slots=True)
class FirmwareBlob:
    """UEFI_PLATFORM_FIRMWARE_BLOB (base and length in bytes) or, with a description,
    UEFI_PLATFORM_FIRMWARE_BLOB2. Also the 16-byte form of ``EV_POST_CODE``."""

    base: int
    length: int
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "firmware_blob",
            "base": f"0x{self.base:x}",
            "length": self.length,
            "description": self.description,
        }


@dataclass(frozen=True, slots=True)
class SignatureData:
    """EFI_SIGNATURE_DATA: an owner GUID and one signature (an X.509 certificate in DER, a
    SHA-256 digest, ...).

    ``signature_type`` comes from the enclosing EFI_SIGNATURE_LIST. It is None for the single
    entry that an ``EV_EFI_VARIABLE_AUTHORITY`` event records, which has no list around it.
    """

    owner: UUID
    data: bytes
    signature_type: UUID | None = None

    @property
    def is_x509(self) -> bool:
        return self.signature_type == EFI_CERT_X509_GUID

    @property
    def is_sha256(self) -> bool:
        return self.signature_type == EFI_CERT_SHA256_GUID

    def certificate(self) -> x509.Certificate:
        """Load ``data`` as a DER X.509 certificate; raise ParseError if it is not one."""
        try:
            return x509.load_der_x509_certificate(self.data)
        except ValueError as exc:
            raise ParseError(
                f"signature data owned by {self.owner} is not a DER X.509 certificate: {exc}",
                code="eventlog-certificate-invalid",
            ) from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": str(self.owner),
            "signature_type": None if self.signature_type is None else str(self.signature_type),
            "data": self.data.hex(),
        }


@dataclass(frozen=True, slots=True)
class SignatureList:
    """EFI_SIGNATURE_LIST: signatures of one type, each of the same size."""

    signature_type: UUID
    header: bytes
    signatures: tuple[SignatureData, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "signature_type": str(self.signature_type),
            "header": self.header.hex(),
            "signatures": [signature.to_json() for signature in self.signatures],
        }


@dataclass(frozen=True, slots=True)
class LoadOption:
    """EFI_LOAD_OPTION, the contents of a ``Boot####`` variable."""

    attributes: int
    description: str
    device_path: bytes
    device_path_text: str | None
    optional_data: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": self.attributes,
            "description": self.description,
            "device_path": self.device_path_text,
            "device_path_raw": self.device_path.hex(),
            "optional_data": self.optional_data.hex(),
        }


@dataclass(frozen=True, slots=True)
class UefiVariable:
    """UEFI_VARIABLE_DATA: a UEFI variable as measured into a PCR.

    ``data`` is the variable's contents. At most one decoded view is set, when the contents
    have its layout:

    - ``signature_lists`` for a Secure Boot or MOK database (PK, KEK, db, dbx, MokList ...);
    - ``signature`` for the one database entry that an ``EV_EFI_VARIABLE_AUTHORITY`` event
      records (db, vendor_db, MokList);
    - ``load_option`` for ``Boot####`` and ``boot_order`` for ``BootOrder``.

    Other variables (``SecureBoot``, ``SbatLevel`` text, ``MokListTrusted``'s one byte, shim's
    raw ``Shim`` certificate) keep only ``data``.
    """

    vendor_guid: UUID
    name: str
    data: bytes
    signature_lists: tuple[SignatureList, ...] | None = None
    signature: SignatureData | None = None
    load_option: LoadOption | None = None
    boot_order: tuple[int, ...] | None = None

    @property
    def signatures(self) -> tuple[SignatureData, ...]:
        """Every signature in ``signature_lists``, in order, or an empty tuple."""
        if self.signature_lists is None:
            return ()
        return tuple(entry for sig_list in self.signature_lists for entry in sig_list.signatures)

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "kind": "uefi_variable",
            "vendor_guid": str(self.vendor_guid),
            "name": self.name,
            "data": self.data.hex(),
        }
        if self.signature_lists is not None:
            result["signature_lists"] = [sig_list.to_json() for sig_list in self.signature_lists]
        if self.signature is not None:
            result["signature"] = self.signature.to_json()
        if self.load_option is not None:
            result["load_option"] = self.load_option.to_json()
        if self.boot_order is not None:
            result["boot_order"] = [f"Boot{number:04X}" for number in self.boot_order]
        return result


@dataclass(frozen=True, slots=True)
class ImageLoadEvent:
    """UEFI_IMAGE_LOAD_EVENT: a PE/COFF image that firmware or shim loaded. The event's digest
    is the image's Authenticode hash."""

    image_location: int
    image_length: int
    link_time_address: int
    device_path: bytes
    device_path_text: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "image_load",
            "image_location": f"0x{self.image_location:x}",
            "image_length": self.image_length,
            "link_time_address": f"0x{self.link_time_address:x}",
            "device_path": self.device_path_text,
            "device_path_raw": self.device_path.hex(),
        }


@dataclass(frozen=True, slots=True)
class HandoffTables:
    """UEFI_HANDOFF_TABLE_POINTERS (and ...2 with a description): configuration tables that
    firmware handed to the OS, as (vendor GUID, address) pairs."""

    tables: tuple[tuple[UUID, int], ...]
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "handoff_tables",
            "description": self.description,
            "tables": [{"vendor_guid": str(guid), "address": f"0x{address:x}"}
                       for guid, address in self.tables],
        }


@dataclass(frozen=True, slots=True)
class GptPartition:
    """EFI_PARTITION_ENTRY."""

    type_guid: UUID
    unique_guid: UUID
    starting_lba: int
    ending_lba: int
    attributes: int
    name: str

    def to_json(self) -> dict[str, Any]:
        return {
            "type_guid": str(self.type_guid),
            "unique_guid": str(self.unique_guid),
            "starting_lba": self.starting_lba,
            "ending_lba": self.ending_lba,
            "attributes": f"0x{self.attributes:x}",
            "name": self.name,
        }


@dataclass(frozen=True, slots=True)
class GptData:
    """UEFI_GPT_DATA: the boot disk's GUID partition table header and its partitions."""

    disk_guid: UUID
    partitions: tuple[GptPartition, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "gpt",
            "disk_guid": str(self.disk_guid),
            "partitions": [partition.to_json() for partition in self.partitions],
        }


EventData = (
    SpecIdEvent
    | StartupLocality
    | Text
    | IplText
    | GuidData
    | Separator
    | FirmwareBlob
    | UefiVariable
    | ImageLoadEvent
    | HandoffTables
    | GptData
)
