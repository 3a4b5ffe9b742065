"""Measure quote verifications per second: edgetrust, the bare signature check, and Keylime.

Usage (from the repository root)::

    .venv/bin/python bench/bench_quote.py [--keylime-python .venv-keylime/bin/python]

The script starts swtpm on 127.0.0.1, makes two quotes with tpm2-tools (RSA-2048 AK with
RSASSA-SHA256 and ECC P-256 AK with ECDSA-SHA256, both over sha256:0,1,2,3,4,5,6,7,10 with a
20-character alphanumeric nonce as Keylime sends), stops swtpm, then times on the same files:

- ``signature only``: ``cryptography``'s verify of the TPMT_SIGNATURE over TPMS_ATTEST with
  the key already loaded. This is the floor that no verifier can beat.
- ``edgetrust verify_quote``: every check of ``evidence.quote.verify_quote`` from the
  attest and signature bytes, including qualifiedSigner, with the AK looked up in
  ``load_ak_public``'s cache and the PCR values already parsed.
- ``edgetrust from files``: the same plus parsing the tpm2-tools PCR file, which is what
  Keylime's ``checkquote`` gets.
- ``keylime checkquote``: ``keylime.tpm.tpm_util.checkquote`` on the same files, run by
  ``--keylime-python`` (an interpreter of a venv with keylime installed) in a subprocess
  that times itself. It gets the AK as PEM, converted once and untimed, and loads that PEM
  on every call. (Keylime's verifier also converts TPM2B_PUBLIC to PEM before every call,
  which this column leaves out.) It checks the signature, the nonce and
  pcrDigest, but not the PCR selection, qualifiedSigner or counters. Without the option the
  column is skipped.

Each figure is the best of ``--rounds`` rounds of ``--iterations`` calls, as ``timeit``
reports it, because other processes on the machine only ever slow a round down. The three
in-process columns run their rounds interleaved, so a busy moment hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402

from evidence.quote import load_ak_public, verify_quote  # noqa: E402
from evidence.tpm import (  # noqa: E402
    PcrSelection,
    TpmAlg,
    ak_qualified_name,
    hash_algorithm,
    parse_pcr_file,
    parse_tpm2b_public,
    parse_tpmt_signature,
)
from tests.support.swtpm import SwtpmProcess  # noqa: E402

SELECTION = "sha256:0,1,2,3,4,5,6,7,10"
# Keylime's verifier sends a 20-character alphanumeric nonce; its ASCII bytes are extraData.
NONCE = "k3yl1meN0nce4bench01"
QUIET_LOGGING = REPO_ROOT.parent / "shared" / "keylime-bench" / "keylime_logging_quiet.conf"

KEYS = {
    "RSA-2048 rsassa-sha256": ["-G", "rsa", "-g", "sha256", "-s", "rsassa"],
    "ECC P-256 ecdsa-sha256": ["-G", "ecc", "-g", "sha256", "-s", "ecdsa"],
}

KEYLIME_SCRIPT = """
import json, sys, time
from cryptography.hazmat.primitives import serialization
from keylime.tpm import tpm2_objects, tpm_util
work, nonce, iterations, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
read = lambda name: open(f"{work}/{name}", "rb").read()
# checkquote takes the AK as PEM. Keylime 7.14.3's verifier converts the registrar's
# TPM2B_PUBLIC before every call (Tpm._tpm2_checkquote); here it happens once, untimed.
ak = tpm2_objects.pubkey_from_tpm2b_public(read("ak.pub")).public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
attest, signature, pcrs = read("quote.msg"), read("quote.sig"), read("quote.pcrs")
tpm_util.checkquote(ak, nonce, signature, attest, pcrs, "sha256")
per_call = []
for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iterations):
        tpm_util.checkquote(ak, nonce, signature, attest, pcrs, "sha256")
    per_call.append((time.perf_counter() - start) / iterations)
print(json.dumps({"seconds": min(per_call)}))
"""


def make_quote(work: Path, key_options: list[str]) -> None:
    """Create EK, AK and a quote with tpm2-tools in ``work`` on a fresh swtpm."""
    with SwtpmProcess(work / "tpm") as tpm:
        tpm.run_tool("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub", cwd=work)
        tpm.run_tool(
            "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", *key_options,
            "-u", "ak.pub", "-n", "ak.name", "-r", "ak.priv", cwd=work,
        )
        tpm.run_tool("tpm2_pcrextend", "10:sha256=" + "ab" * 32, cwd=work)
        tpm.run_tool(
            "tpm2_quote", "-c", "ak.ctx", "-l", SELECTION, "-q", NONCE.encode().hex(),
            "-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs", "-g", "sha256", cwd=work,
        )


def best_seconds(
    calls: dict[str, Callable[[], Any]], iterations: int, rounds: int
) -> dict[str, float]:
    """Return the best per-call time of each call, running their rounds interleaved."""
    for call in calls.values():
        call()
    per_call: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(iterations):
                call()
            per_call[name].append((time.perf_counter() - start) / iterations)
    return {name: min(times) for name, times in per_call.items()}


def signature_only(work: Path) -> Callable[[], None]:
    ak = load_ak_public((work / "ak.pub").read_bytes())
    attest = (work / "quote.msg").read_bytes()
    signature = parse_tpmt_signature((work / "quote.sig").read_bytes()).signature
    algorithm = hash_algorithm(TpmAlg.SHA256)
    key = ak.public_key
    if isinstance(key, rsa.RSAPublicKey):
        rsa_key, pkcs1 = key, padding.PKCS1v15()
        return lambda: rsa_key.verify(signature, attest, pkcs1, algorithm)
    ecdsa = ec.ECDSA(algorithm)
    return lambda: key.verify(signature, attest, ecdsa)


def edgetrust_calls(work: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    ak_bytes = (work / "ak.pub").read_bytes()
    attest = (work / "quote.msg").read_bytes()
    signature = (work / "quote.sig").read_bytes()
    pcr_file = (work / "quote.pcrs").read_bytes()
    selection = PcrSelection.from_text(SELECTION)
    nonce = NONCE.encode()
    values = parse_pcr_file(pcr_file).values
    qualified_name = ak_qualified_name(
        parse_tpm2b_public((work / "ek.pub").read_bytes()), load_ak_public(ak_bytes)
    )

    def verify_parsed() -> None:
        result = verify_quote(
            load_ak_public(ak_bytes), attest, signature, nonce=nonce,
            pcr_selection=selection, pcr_values=values, ak_qualified_name=qualified_name,
        )
        assert not result.findings, result.findings

    def verify_files() -> None:
        result = verify_quote(
            load_ak_public(ak_bytes), attest, signature, nonce=nonce,
            pcr_selection=selection, pcr_values=parse_pcr_file(pcr_file).values,
            ak_qualified_name=qualified_name,
        )
        assert not result.findings, result.findings

    return verify_parsed, verify_files


def keylime_seconds(python: str, work: Path, iterations: int, rounds: int) -> float:
    env = dict(os.environ)
    if QUIET_LOGGING.exists():
        env.setdefault("KEYLIME_LOGGING_CONFIG", str(QUIET_LOGGING))
    completed = subprocess.run(
        [python, "-c", KEYLIME_SCRIPT, str(work), NONCE, str(iterations), str(rounds)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"keylime checkquote failed: {completed.stderr.strip()[-2000:]}")
    return float(json.loads(completed.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keylime-python", help="python of a venv with keylime 7.14.3")
    parser.add_argument("--iterations", type=int, default=1000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds; the best is reported")
    arguments = parser.parse_args()

    header = ["quote", "signature only", "edgetrust verify_quote", "edgetrust from files",
              "keylime checkquote"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quote-") as scratch:
        for label, key_options in KEYS.items():
            work = Path(scratch) / label.split()[0]
            work.mkdir()
            make_quote(work, key_options)
            verify_parsed, verify_files = edgetrust_calls(work)
            best = best_seconds(
                {"floor": signature_only(work), "ours": verify_parsed, "files": verify_files},
                arguments.iterations, arguments.rounds,
            )
            floor, ours, ours_files = best["floor"], best["ours"], best["files"]
            keylime = (
                keylime_seconds(arguments.keylime_python, work, arguments.iterations // 4,
                                arguments.rounds)
                if arguments.keylime_python
                else None
            )
            rows.append([
                label,
                f"{1 / floor:,.0f}/s ({floor * 1e6:.1f} µs)",
                f"{1 / ours:,.0f}/s ({ours * 1e6:.1f} µs, {ours / floor:.2f}x floor)",
                f"{1 / ours_files:,.0f}/s ({ours_files * 1e6:.1f} µs, "
                f"{ours_files / floor:.2f}x floor)",
                f"{1 / keylime:,.0f}/s ({keylime * 1e6:.1f} µs)" if keylime
                else "skipped: no --keylime-python",
            ])

    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
