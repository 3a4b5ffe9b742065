"""Measure IMA measurement list parsing and replay: edgetrust against Keylime.

Usage (from the repository root)::

    .venv/bin/python bench/bench_ima.py [--entries 100000] [--rounds 5]
        [--keylime-python .venv-keylime/bin/python]

The script writes into a temporary directory an ``ima-ng`` list of ``--entries`` entries with
SHA-256 file digests (the first one ``boot_aggregate``, template hashes SHA-1) and computes
PCR 10 of the SHA-256 bank with its own short replay. Then it times, on the same file:

- ``edgetrust parse``: ``evidence.ima.parse_ascii_list`` from the file's bytes.
- ``edgetrust parse + replay``: the same plus ``verify_measurement_list`` against PCR 10 of
  the SHA-256 bank: template-hash check, replay and prefix match. This is the headline figure.
  Lists of 4,096 entries or more are hashed in two threads (``evidence.ima.native``).
- ``edgetrust parse + replay, one thread``: the same with the second thread turned off.
- ``edgetrust parse + replay + runtime policy``: the same plus ``policies.runtime.evaluate``
  of the verified entries against a compiled runtime policy that lists every entry's digest,
  which is what Keylime's column does too. ``bench_policy.py`` measures policy evaluation
  with a larger policy.
- ``keylime process_measurement_list``: Keylime's IMA check of the same lines with a runtime
  policy that allows every entry, PCR 10 of the SHA-256 bank and a fresh
  ``AgentAttestState``. It runs in a subprocess that times each run itself, started with
  ``--keylime-python``: an interpreter of a virtual environment with Keylime 7.14.3, such as
  the one ``scripts/setup-keylime.sh`` builds. Without the option, or when that interpreter does not exist,
  the column is skipped with a note.

Each figure is the best of ``--rounds`` runs, because other processes on the machine only ever
slow a run down. Every round runs each column once, Keylime's included, so a busy moment hits
all of them alike. The script prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from evidence.findings import is_failure  # noqa: E402
from evidence.ima import parse_ascii_list, verify_measurement_list  # noqa: E402
from evidence.ima.native import ReplayThreads  # noqa: E402
from policies.runtime import empty_policy_document, evaluate, parse_runtime_policy  # noqa: E402

QUIET_LOGGING = REPO_ROOT.parent / "shared" / "keylime-bench" / "keylime_logging_quiet.conf"

# Runs in Keylime's interpreter: builds the policy once, then times one check of the list
# for every line it reads on stdin and prints the seconds.
KEYLIME_SCRIPT = """
import sys, time
from keylime.agentstates import AgentAttestState
from keylime.common.algorithms import Hash
from keylime.ima import ima
path, pcr10 = sys.argv[1], sys.argv[2]
text = open(path).read()
policy = ima.empty_policy()
for line in text.splitlines():
    digest_field, name = line.split(" ", 4)[3:]
    policy["digests"].setdefault(name, []).append(digest_field.split(":", 1)[1])
policy["ima"]["log_hash_alg"] = "sha1"
ima.validate_runtime_policy(policy)
print("ready", flush=True)
for _ in sys.stdin:
    state = AgentAttestState("bench")
    started = time.perf_counter()
    _, failure = ima.process_measurement_list(
        state, text.split("\\n"), policy, pcrval=pcr10, hash_alg=Hash.SHA256)
    seconds = time.perf_counter() - started
    if failure:
        sys.exit("keylime rejected the list: " + ",".join(sorted(set(failure.get_event_ids()))))
    print(seconds, flush=True)
"""


def ima_ng_template_data(digest: bytes, path: str) -> bytes:
    d_ng = b"sha256:\0" + digest
    n_ng = path.encode() + b"\0"
    return struct.pack("<I", len(d_ng)) + d_ng + struct.pack("<I", len(n_ng)) + n_ng


def write_list(path: Path, entries: int) -> tuple[bytes, dict[str, set[str]]]:
    """Write the list; return PCR 10 of the SHA-256 bank and the allow-list of its entries."""
    pcr10 = bytes(32)
    allowed: dict[str, set[str]] = {}
    lines = []
    for number in range(entries):
        name = (
            "boot_aggregate" if number == 0 else f"/usr/lib/bench/d{number // 100:05d}/lib{number:07d}.so.1"
        )
        digest = hashlib.sha256(b"file-%d" % number).digest()
        data = ima_ng_template_data(digest, name)
        lines.append(f"10 {hashlib.sha1(data).hexdigest()} ima-ng sha256:{digest.hex()} {name}\n")
        pcr10 = hashlib.sha256(pcr10 + hashlib.sha256(data).digest()).digest()
        allowed.setdefault(name, set()).add(digest.hex())
    path.write_text("".join(lines))
    return pcr10, allowed


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def edgetrust_runs(
    data: bytes, pcr10: bytes, allowed: dict[str, set[str]], entries: int
) -> dict[str, Callable[[], object]]:
    def parse() -> object:
        parsed = parse_ascii_list(data)
        assert len(parsed) == entries
        return parsed

    def parse_and_replay() -> object:
        result = verify_measurement_list(parse_ascii_list(data), {"sha256": pcr10})
        assert not is_failure(result.findings)
        assert len(result.verified_entries) == entries
        return result

    def one_thread() -> object:
        parallel_from = ReplayThreads.parallel_from
        ReplayThreads.parallel_from = entries + 1
        try:
            return parse_and_replay()
        finally:
            ReplayThreads.parallel_from = parallel_from

    document = empty_policy_document()
    document["digests"] = {path: sorted(digests) for path, digests in allowed.items()}
    document["ima"]["log_hash_alg"] = "sha1"
    policy = parse_runtime_policy(document)

    def with_policy() -> object:
        result = verify_measurement_list(parse_ascii_list(data), {"sha256": pcr10})
        findings = evaluate(result.verified_entries, policy)
        assert not is_failure(result.findings)
        assert not findings, findings[:3]
        return result

    return {
        "edgetrust parse": parse,
        "edgetrust parse + replay (sha256)": parse_and_replay,
        "edgetrust parse + replay, one thread": one_thread,
        "edgetrust parse + replay + runtime policy": with_policy,
    }


class KeylimeChild:
    """Keylime's check of the list in an interpreter of its own, one timed run per request."""

    def __init__(self, keylime_python: Path, list_path: Path, pcr10: bytes):
        environment = dict(os.environ)
        if QUIET_LOGGING.is_file():
            environment.setdefault("KEYLIME_LOGGING_CONFIG", str(QUIET_LOGGING))
        # Keylime logs its configuration lookup on import; keep that out of the table.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [str(keylime_python), "-c", KEYLIME_SCRIPT, str(list_path), pcr10.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=environment,
        )
        self._expect("ready")

    def run(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self._expect(None))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.stderr.close()

    def _expect(self, word: str | None) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line or (word is not None and line != word):
            self.process.kill()
            status = self.process.wait()
            self.stderr.seek(0)
            raise SystemExit(f"keylime run failed (exit status {status}): {self.stderr.read().strip()}")
        return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=100_000, help="entries in the generated list")
    parser.add_argument("--rounds", type=int, default=5, help="runs per figure; the best one counts")
    parser.add_argument(
        "--keylime-python", type=Path, default=None, help="python of a venv with keylime 7.14.3"
    )
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ima-") as work:
        list_path = Path(work) / "ascii_runtime_measurements"
        pcr10, allowed = write_list(list_path, arguments.entries)
        data = list_path.read_bytes()

        runs = edgetrust_runs(data, pcr10, allowed, arguments.entries)
        keylime = None
        note = ""
        if arguments.keylime_python is None or not arguments.keylime_python.exists():
            note = "keylime column skipped: pass --keylime-python with a venv that has keylime 7.14.3"
        else:
            keylime = KeylimeChild(arguments.keylime_python, list_path, pcr10)

        # Rounds interleave every column, so a busy moment on the machine hits all of them.
        samples: dict[str, list[float]] = {name: [] for name in runs}
        keylime_name = "keylime 7.14.3 process_measurement_list (allow-all policy)"
        for _ in range(arguments.rounds):
            for name, run in runs.items():
                samples[name].append(timed(run))
            if keylime is not None:
                samples.setdefault(keylime_name, []).append(keylime.run())
        if keylime is not None:
            keylime.close()
        figures = {name: min(seconds) for name, seconds in samples.items()}

    keylime_seconds = figures.get(keylime_name)
    print(f"{arguments.entries:,} ima-ng entries (sha256 file digests), best of {arguments.rounds} runs\n")
    print("| what | time | µs per entry | entries per second | Keylime time ÷ this |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in figures.items():
        ratio = f"{keylime_seconds / seconds:.1f}×" if keylime_seconds else "–"
        print(
            f"| {name} | {seconds * 1000:.0f} ms | {seconds / arguments.entries * 1e6:.2f} | "
            f"{arguments.entries / seconds:,.0f} | {ratio} |"
        )
    if note:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
