"""Measured-boot policies against Keylime 7.14.3 itself.

For each fixture event log that Keylime parses, Keylime's own generator
(``keylime.policy.create_mb_policy``) makes a reference state. That reference state and
mutations of it (a wrong kernel digest, a removed db entry, Secure Boot expected but off ...)
are evaluated by Keylime's ``example`` measured-boot policy and by edgetrust, and must pass or
fail alike. edgetrust rejects at load time a reference state that Keylime fails at every
evaluation, which counts as failing. Keylime runs in its own venv (.venv-keylime) through a
subprocess; the tests are skipped when that venv or tpm2_eventlog is missing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from evidence.eventlog import parse_event_log
from policies.errors import PolicyError
from policies.measured_boot import evaluate_measured_boot, parse_measured_boot_policy
from policies.measured_boot_generate import create_measured_boot_policy
from tests.conftest import REPO_ROOT

KEYLIME_PYTHON = REPO_ROOT / ".venv-keylime" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not KEYLIME_PYTHON.exists() or shutil.which("tpm2_eventlog") is None,
    reason="needs Keylime's venv (.venv-keylime) and tpm2_eventlog from tpm2-tools",
)

# Logs Keylime's parser reads. The others (SHA-1-format logs, a lone StartupLocality event,
# text and empty files) make keylime's tpm2_eventlog step fail before any policy applies.
KEYLIME_PARSABLE_LOGS = [
    "go-attestation-crypto_agile_eventlog",
    "keylime-binary_bios_measurements",
    "keylime-binary_bios_measurements-secureboot",
    "rust-keylime-uefi_log.bin",
    "tpm2-tools-event-arch-linux.bin",
    "tpm2-tools-event-moklisttrusted.bin",
    "tpm2-tools-event-postcode.bin",
]

# Runs in Keylime's venv. Reads {"eventlog": path, "refstates": [...]} on stdin and prints
# {"generated": <Keylime's reference state or null>, "reasons": ["" for pass, else why]}.
ORACLE = r'''
import argparse, base64, json, sys, tempfile
from keylime.mba import mba
from keylime.mba.elchecking import policies
from keylime.policy import create_mb_policy

request = json.load(sys.stdin)
mba.load_imports(skip_custom_policies=True)

with tempfile.NamedTemporaryFile("r", suffix=".json") as output:
    arguments = argparse.Namespace(eventlog_file=request["eventlog"], without_secureboot=True,
                                   output=output.name)
    generated = create_mb_policy.create_mb_refstate(arguments)

raw = open(request["eventlog"], "rb").read()
_pcrs, _aggregates, measurements, failure = mba.bootlog_parse(base64.b64encode(raw).decode(), "sha256")
if failure:
    raise SystemExit("keylime could not parse the event log")

reasons = []
for refstate in request["refstates"]:
    # As keylime.mba.elchecking.elchecker.bootlog_evaluate does with the example policy.
    try:
        reasons.append(policies.get_policy("example").evaluate(refstate, measurements))
    except Exception as error:
        reasons.append(f"policy evaluation failed: {error}")
print(json.dumps({"generated": generated, "reasons": reasons}))
'''


def run_keylime(eventlog: Path, refstates: list[dict[str, Any]]) -> dict[str, Any]:
    environment = dict(os.environ)
    environment.setdefault(
        "KEYLIME_LOGGING_CONFIG",
        str(REPO_ROOT.parent / "shared" / "keylime-bench" / "keylime_logging_quiet.conf"),
    )
    completed = subprocess.run(
        [str(KEYLIME_PYTHON), "-c", ORACLE],
        input=json.dumps({"eventlog": str(eventlog), "refstates": refstates}),
        capture_output=True, text=True, timeout=120, env=environment, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def edgetrust_passes(refstate: dict[str, Any], eventlog: Path) -> bool:
    try:
        policy = parse_measured_boot_policy(refstate)
    except PolicyError:
        return False
    log = parse_event_log(eventlog.read_bytes())
    return evaluate_measured_boot(policy, log, quoted_pcrs=range(24)) == []


Mutation = Callable[[dict[str, Any]], None]


def _set_kernel(key: str, value: str) -> Mutation:
    def apply(refstate: dict[str, Any]) -> None:
        for kernel in refstate.get("kernels", []):
            kernel[key] = value
    return apply


def _drop_first(key: str) -> Mutation:
    def apply(refstate: dict[str, Any]) -> None:
        if refstate.get(key):
            refstate[key].pop(0)
    return apply


def _expect_secure_boot(refstate: dict[str, Any]) -> None:
    refstate["has_secureboot"] = True
    for kernel in refstate.get("kernels", []):
        kernel.setdefault("kernel_authcode_sha256", "0x" + "ab" * 32)


def _add_dbx_entry(refstate: dict[str, Any]) -> None:
    refstate["dbx"].append({"SignatureOwner": "77fa9abd-0359-4d32-bd60-28f4e78f784b",
                            "SignatureData": "0x" + "cd" * 32})


def _add_wrong_kernel_first(refstate: dict[str, Any]) -> None:
    kernels = refstate.get("kernels", [])
    if kernels:
        wrong = dict(kernels[0], grub_authcode_sha256="0x" + "ab" * 32)
        kernels.insert(0, wrong)


def _scrtm(refstate: dict[str, Any]) -> None:
    refstate["scrtm_and_bios"][0]["scrtm"] = {"sha256": "0x" + "ab" * 32}


def _drop_firmware_blob(refstate: dict[str, Any]) -> None:
    blobs = refstate["scrtm_and_bios"][0]["platform_firmware"]
    if blobs:
        blobs.pop()


def _mokdig(refstate: dict[str, Any]) -> None:
    refstate["mokdig"] = [{"sha256": "0x" + "ab" * 32}]


MUTATIONS: dict[str, Mutation] = {
    "unchanged": lambda refstate: None,
    "wrong kernel digest": _set_kernel("kernel_authcode_sha256", "0x" + "ab" * 32),
    "wrong shim digest": _set_kernel("shim_authcode_sha256", "0x" + "ab" * 32),
    "wrong initrd digest": _set_kernel("initrd_plain_sha256", "0x" + "ab" * 32),
    "other kernel command line": _set_kernel("kernel_cmdline", "quiet splash"),
    "any kernel command line": _set_kernel("kernel_cmdline", ".*"),
    "removed pk entry": _drop_first("pk"),
    "removed kek entry": _drop_first("kek"),
    "removed db entry": _drop_first("db"),
    "removed vendor_db entry": _drop_first("vendor_db"),
    "extra dbx entry": _add_dbx_entry,
    "secure boot expected but off": _expect_secure_boot,
    "wrong S-CRTM": _scrtm,
    "missing firmware blob": _drop_firmware_blob,
    "wrong MokList digest": _mokdig,
    "wrong kernel entry first": _add_wrong_kernel_first,
}


@pytest.mark.parametrize("name", KEYLIME_PARSABLE_LOGS)
def test_verdicts_match_keylime(fixtures_dir: Path, name: str) -> None:
    eventlog = fixtures_dir / "eventlog" / name
    generated = run_keylime(eventlog, [])["generated"]
    if generated is None:
        pytest.skip(f"Keylime's generator makes no reference state from {name}")

    cases = {}
    for label, mutation in MUTATIONS.items():
        refstate = copy.deepcopy(generated)
        mutation(refstate)
        cases[label] = refstate
    reasons = run_keylime(eventlog, list(cases.values()))["reasons"]

    keylime = {label: not reason for label, reason in zip(cases, reasons, strict=True)}
    edgetrust = {label: edgetrust_passes(refstate, eventlog) for label, refstate in cases.items()}
    assert edgetrust == keylime, {label: reason[-300:] for label, reason in zip(cases, reasons,
                                                                                strict=True)}


@pytest.mark.parametrize("name", KEYLIME_PARSABLE_LOGS)
def test_generator_matches_keylime(fixtures_dir: Path, name: str) -> None:
    eventlog = fixtures_dir / "eventlog" / name
    generated = run_keylime(eventlog, [])["generated"]
    log = parse_event_log(eventlog.read_bytes())

    try:
        ours = create_measured_boot_policy(log, allow_without_secureboot=True)
    except PolicyError:
        # Keylime writes a reference state without the parts the log lacks; no evaluation
        # of it passes.
        assert generated is None or not edgetrust_passes(generated, eventlog)
        return

    assert ours == generated


def test_secureboot_logs_pass_in_both(fixtures_dir: Path) -> None:
    # The two Secure Boot logs from real machines pass unchanged in both implementations;
    # without them the comparison above would only show failures agreeing.
    for name in ("keylime-binary_bios_measurements-secureboot", "tpm2-tools-event-moklisttrusted.bin"):
        eventlog = fixtures_dir / "eventlog" / name
        result = run_keylime(eventlog, [])
        reasons = run_keylime(eventlog, [result["generated"]])["reasons"]

        assert reasons == [""]
        assert edgetrust_passes(result["generated"], eventlog)


def test_startup_locality_known_difference(fixtures_dir: Path, tmp_path: Path) -> None:
    # A StartupLocality EV_NO_ACTION event is never extended into a PCR. Keylime allows only
    # one EV_NO_ACTION event (the Spec ID event) and fails this log; edgetrust skips both.
    from tests.policies.test_measured_boot import with_startup_locality

    source = fixtures_dir / "eventlog" / "keylime-binary_bios_measurements-secureboot"
    eventlog = tmp_path / "with-startup-locality"
    eventlog.write_bytes(with_startup_locality(source.read_bytes()))
    generated = run_keylime(eventlog, [])["generated"]

    reasons = run_keylime(eventlog, [generated])["reasons"]

    assert "already run once" in reasons[0]
    assert edgetrust_passes(generated, eventlog)
