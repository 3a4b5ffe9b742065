"""IMA measurement lists: parsing, replay into PCR 10, and verification against a quote.

Typical use by a verifier::

    state = ImaReplayState.from_json(stored) if stored else ImaReplayState()
    # ask the device for the list from entry state.next_index, then:
    unverified_list = parse_ascii_list(text, start_index=state.next_index)
    result = verify_measurement_list(unverified_list, {"sha256": quoted_pcr10}, state)
    # evaluate result.verified_entries against the runtime policy; if everything passed,
    # store result.next_state.to_json()
"""

from evidence.ima.algorithms import BANK_DIGEST_SIZES, KERNEL_DIGEST_SIZES
from evidence.ima.ascii import format_ascii_list, parse_ascii_lines, parse_ascii_list
from evidence.ima.binary import (
    format_binary_list,
    is_binary_list,
    parse_binary_list,
    parse_measurement_list,
)
from evidence.ima.boot_aggregate import (
    boot_aggregate_pcrs,
    check_boot_aggregate,
    compute_boot_aggregate,
)
from evidence.ima.checks import check_buffer_digests, check_template_hashes, describe_entries
from evidence.ima.entry import (
    BOOT_AGGREGATE_NAME,
    IMA_PCR,
    SUPPORTED_TEMPLATES,
    TEMPLATE_IMA,
    TEMPLATE_IMA_BUF,
    TEMPLATE_IMA_NG,
    TEMPLATE_IMA_SIG,
    ImaEntry,
    ImaMeasurementList,
)
from evidence.ima.reader import ImaListReader, read_ascii_list
from evidence.ima.replay import ImaReplayState, extend_value, replay_pcr10
from evidence.ima.signatures import (
    ImaSignature,
    PublicKey,
    ima_key_id,
    parse_ima_signature,
    verify_entry_signature,
    verify_ima_signature,
)
from evidence.ima.verification import ImaVerification, verify_measurement_list

__all__ = [
    "BANK_DIGEST_SIZES",
    "BOOT_AGGREGATE_NAME",
    "IMA_PCR",
    "KERNEL_DIGEST_SIZES",
    "SUPPORTED_TEMPLATES",
    "TEMPLATE_IMA",
    "TEMPLATE_IMA_BUF",
    "TEMPLATE_IMA_NG",
    "TEMPLATE_IMA_SIG",
    "ImaEntry",
    "ImaListReader",
    "ImaMeasurementList",
    "ImaReplayState",
    "ImaSignature",
    "ImaVerification",
    "PublicKey",
    "boot_aggregate_pcrs",
    "check_boot_aggregate",
    "check_buffer_digests",
    "check_template_hashes",
    "compute_boot_aggregate",
    "describe_entries",
    "extend_value",
    "format_ascii_list",
    "format_binary_list",
    "ima_key_id",
    "is_binary_list",
    "parse_ascii_lines",
    "parse_ascii_list",
    "parse_binary_list",
    "parse_ima_signature",
    "parse_measurement_list",
    "read_ascii_list",
    "replay_pcr10",
    "verify_entry_signature",
    "verify_ima_signature",
    "verify_measurement_list",
]
