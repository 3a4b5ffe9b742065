"""Run Keylime's own IMA check on a list and a runtime policy; used by the compatibility tests.

Runs inside Keylime's virtual environment, never edgetrust's. It reads one JSON object on stdin,
``{"lines": [...], "policy": {...}, "boot_aggregates": {alg: [hex]} | null}``, and writes
``{"full": [event ids], "entries": [[event ids], ...]}``. ``full`` lists the failure events of
``keylime.ima.ima.process_measurement_list`` over the whole list. ``entries`` lists them for each
line alone, with one keyring object shared across the calls, so that keys learned from earlier
``ima-buf`` lines verify later lines as in one whole-list call. PCR 10 is not checked.
"""

import copy
import json
import sys

from keylime.common.algorithms import Hash
from keylime.ima import ima
from keylime.ima.file_signatures import ImaKeyring, ImaKeyrings


def keyrings_for(policy):
    keyrings = ImaKeyrings()
    keyrings.set_tenant_keyring(ImaKeyring.from_string(policy.get("verification-keys") or ""))
    return keyrings


def event_ids(failure):
    return sorted(event.event_id for event in failure.events)


def main():
    request = json.load(sys.stdin)
    lines = request["lines"]
    policy = request["policy"]
    boot_aggregates = request.get("boot_aggregates")

    _, failure = ima.process_measurement_list(
        None,
        list(lines),
        copy.deepcopy(policy),
        ima_keyrings=keyrings_for(policy),
        boot_aggregates=boot_aggregates,
        hash_alg=Hash.SHA1,
    )
    result = {"full": event_ids(failure), "entries": []}

    keyrings = keyrings_for(policy)
    for line in lines:
        _, failure = ima.process_measurement_list(
            None,
            [line],
            copy.deepcopy(policy),
            ima_keyrings=keyrings,
            boot_aggregates=boot_aggregates,
            hash_alg=Hash.SHA1,
        )
        result["entries"].append(event_ids(failure))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
