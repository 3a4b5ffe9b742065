"""UEFI event logs (TCG PC Client Platform Firmware Profile): parsing, typed event data,
replay into PCR banks and checks against quoted PCRs.

    raw = read_event_log("/sys/kernel/security/tpm0/binary_bios_measurements")
    unverified_log = parse_event_log(raw)
    findings = verify_event_log(unverified_log, quoted_pcrs)
"""

from evidence.eventlog.data import (
    EventData,
    FirmwareBlob,
    GptData,
    GptPartition,
    GuidData,
    HandoffTables,
    ImageLoadEvent,
    IplText,
    LoadOption,
    Separator,
    SignatureData,
    SignatureList,
    SpecIdEvent,
    StartupLocality,
    Text,
    UefiVariable,
)
from evidence.eventlog.devicepath import DevicePathError, device_path_to_text
from evidence.eventlog.model import Event, EventLog
from evidence.eventlog.parse import EventLogParseError, parse_event_log, read_event_log
from evidence.eventlog.replay import (
    EVENT_LOG_PCRS,
    PcrBanks,
    QuotedPcrs,
    check_event_data,
    compare_replayed_pcrs,
    event_data_matches_digests,
    replay_event_log,
    verify_event_log,
)
from evidence.eventlog.types import (
    EFI_CERT_SHA256_GUID,
    EFI_CERT_X509_GUID,
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    KNOWN_HASH_ALGORITHMS,
    SHIM_LOCK_GUID,
    EventType,
    HashAlgorithm,
    event_type_name,
)

__all__ = [
    "EFI_CERT_SHA256_GUID",
    "EFI_CERT_X509_GUID",
    "EFI_GLOBAL_VARIABLE",
    "EFI_IMAGE_SECURITY_DATABASE",
    "EVENT_LOG_PCRS",
    "KNOWN_HASH_ALGORITHMS",
    "SHIM_LOCK_GUID",
    "DevicePathError",
    "Event",
    "EventData",
    "EventLog",
    "EventLogParseError",
    "EventType",
    "FirmwareBlob",
    "GptData",
    "GptPartition",
    "GuidData",
    "HandoffTables",
    "HashAlgorithm",
    "ImageLoadEvent",
    "IplText",
    "LoadOption",
    "PcrBanks",
    "QuotedPcrs",
    "Separator",
    "SignatureData",
    "SignatureList",
    "SpecIdEvent",
    "StartupLocality",
    "Text",
    "UefiVariable",
    "check_event_data",
    "compare_replayed_pcrs",
    "device_path_to_text",
    "event_data_matches_digests",
    "event_type_name",
    "parse_event_log",
    "read_event_log",
    "replay_event_log",
    "verify_event_log",
]
