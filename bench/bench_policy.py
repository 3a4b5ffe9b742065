"""Measure runtime policy evaluation beside Keylime 7.14.3 on the same inputs.

Usage (from the repository root)::

    .venv/bin/python bench/bench_policy.py [--keylime-python .venv-keylime/bin/python]
        [--entries 100000] [--extra-digests 100000] [--new-entries 20] [--devices 100]
        [--write-docs]

The script writes its inputs into a temporary directory. The list is an ``ima-ng`` list of
``--entries`` entries with SHA-256 file digests and SHA-1 template hashes, the first one
``boot_aggregate``, followed by ``--new-entries`` more. The runtime policy allows every one of
them plus ``--extra-digests`` digests for paths the list never shows: 200,000 digests with the
defaults. PCR 10 of the SHA-256 bank is replayed once here. Then it measures, each side in
processes of its own (Keylime through ``--keylime-python``, its own virtual environment):

1. First full evaluation of the list in a fresh process, the policy already loaded.
   edgetrust: parse the ASCII list, verify it against PCR 10 (template hashes, replay) and
   evaluate the verified entries. Keylime: ``keylime.ima.ima.process_measurement_list``
   with a fresh ``AgentAttestState``, which does the same steps. The best of 3 further runs
   in the same process is shown beside it. The policy check alone is then timed on entries
   parsed beforehand (for Keylime, its ``ima-ng`` validator), best of 7 runs.
2. Policy loading. edgetrust validates and compiles a policy once per content hash. Keylime's
   pull-mode verifier calls ``deserialize_runtime_policy`` (``json.loads``) on every quote.
3. Incremental evaluation of the new entries after a verified prefix, including the policy
   loading each side does per attestation: edgetrust looks the compiled policy up by content
   hash and restores its replay and keyring state from JSON; Keylime deserialises the policy
   and restores an ``AgentAttestState`` at the prefix. Best of 5 rounds.
4. Memory of ``--devices`` devices that use one policy, in fresh processes: tracemalloc and
   RSS growth after 1 and after ``--devices`` devices obtained the policy. edgetrust devices
   call ``load_runtime_policy`` on the stored text and share the cached object. A Keylime
   verifier holds one parsed copy per attestation in flight; the script measures one and
   four copies, and the figure for ``--devices`` copies is that per-copy size times the
   device count, an estimate.

``--write-docs`` replaces the section "Runtime policy evaluation" of docs/benchmarks.md with
the table and this command line.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DOCS = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_TITLE = "## Runtime policy evaluation"
QUIET_LOGGING = REPO_ROOT.parent / "shared" / "keylime-bench" / "keylime_logging_quiet.conf"


# --- inputs -----------------------------------------------------------------------------------


def entry_path(index: int) -> str:
    if index == 0:
        return "boot_aggregate"
    return f"/usr/lib/bench/d{index // 100:05d}/lib{index:07d}.so.1"


def template_data(digest: bytes, path: str) -> bytes:
    d_ng = b"sha256:\0" + digest
    n_ng = path.encode() + b"\0"
    return struct.pack("<I", len(d_ng)) + d_ng + struct.pack("<I", len(n_ng)) + n_ng


def make_inputs(work: Path, entries: int, new_entries: int, extra_digests: int) -> dict[str, Any]:
    """Write the list, the new entries and the policy; return paths and PCR 10 values."""
    lines = []
    digests: dict[str, list[str]] = {}
    pcr10 = bytes(32)
    pcr10_at_prefix = b""
    for index in range(entries + new_entries):
        if index == entries:
            pcr10_at_prefix = pcr10
        path = entry_path(index)
        digest = hashlib.sha256(b"file-%d" % index).digest()
        data = template_data(digest, path)
        lines.append(f"10 {hashlib.sha1(data).hexdigest()} ima-ng sha256:{digest.hex()} {path}\n")
        pcr10 = hashlib.sha256(pcr10 + hashlib.sha256(data).digest()).digest()
        digests[path] = [digest.hex()]
    for index in range(extra_digests):
        path = f"/opt/unrelated/p{index // 1000:03d}/file{index:07d}"
        digests[path] = [hashlib.sha256(b"unrelated-%d" % index).hexdigest()]

    policy = {
        "meta": {"version": 1, "generator": 0},
        "release": 0,
        "digests": digests,
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }
    files = {
        "list": work / "list.ascii",
        "new": work / "new.ascii",
        "policy": work / "policy.json",
    }
    files["list"].write_text("".join(lines[:entries]))
    files["new"].write_text("".join(lines[entries:]))
    files["policy"].write_text(json.dumps(policy))
    return {
        "files": {name: str(path) for name, path in files.items()},
        "entries": entries,
        "new_entries": new_entries,
        "digests": len(digests),
        "pcr10_prefix": pcr10_at_prefix.hex(),
        "pcr10_all": pcr10.hex(),
        "policy_bytes": files["policy"].stat().st_size,
    }


# --- helpers shared by the child processes ----------------------------------------------------


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def best_of(function: Any, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


# --- edgetrust children -----------------------------------------------------------------------


def edgetrust_full(inputs: dict[str, Any]) -> dict[str, Any]:
    from evidence.findings import is_failure
    from evidence.ima import parse_ascii_list, verify_measurement_list
    from policies.runtime import PolicyCache, evaluate, load_runtime_policy

    files = inputs["files"]
    policy_text = Path(files["policy"]).read_bytes()
    start = time.perf_counter()
    policy = load_runtime_policy(policy_text, cache=PolicyCache())
    compile_s = time.perf_counter() - start
    list_bytes = Path(files["list"]).read_bytes()
    pcr10 = {"sha256": bytes.fromhex(inputs["pcr10_prefix"])}

    def full() -> None:
        measurement_list = parse_ascii_list(list_bytes, template_hash_algorithm=policy.log_hash_alg)
        verification = verify_measurement_list(measurement_list, pcr10)
        findings = list(verification.findings) + evaluate(verification.verified_entries, policy)
        assert not is_failure(findings), findings[:3]
        assert verification.next_state.next_index == inputs["entries"]

    start = time.perf_counter()
    full()
    first_s = time.perf_counter() - start
    warm_s = best_of(full, 3)

    entries = parse_ascii_list(list_bytes, template_hash_algorithm="sha1").entries
    evaluate_only_s = best_of(lambda: evaluate(entries, policy), 7)
    return {"compile_s": compile_s, "first_s": first_s, "warm_s": warm_s, "evaluate_only_s": evaluate_only_s}


def edgetrust_incremental(inputs: dict[str, Any]) -> dict[str, Any]:
    from evidence.findings import is_failure
    from evidence.ima import ImaReplayState, parse_ascii_list, verify_measurement_list
    from policies.runtime import (
        EMPTY_KEYRING_STATE,
        KeyringState,
        cached_runtime_policy,
        evaluate_incremental,
        load_runtime_policy,
    )

    files = inputs["files"]
    policy_text = Path(files["policy"]).read_bytes()
    content_hash = load_runtime_policy(policy_text).content_hash
    new_bytes = Path(files["new"]).read_bytes()
    entries = inputs["entries"]
    stored_state = ImaReplayState(
        next_index=entries, pcr10={"sha256": bytes.fromhex(inputs["pcr10_prefix"])}, seen_entries=entries
    ).to_json()
    stored_keys = EMPTY_KEYRING_STATE.to_json()
    pcr10 = {"sha256": bytes.fromhex(inputs["pcr10_all"])}

    def attest(policy_lookup: Any) -> None:
        policy = policy_lookup()
        state = ImaReplayState.from_json(stored_state)
        measurement_list = parse_ascii_list(
            new_bytes, start_index=entries, template_hash_algorithm=policy.log_hash_alg
        )
        verification = verify_measurement_list(measurement_list, pcr10, state)
        evaluation = evaluate_incremental(
            verification.verified_entries, policy, keyring_state=KeyringState.from_json(stored_keys)
        )
        assert not is_failure(list(verification.findings) + evaluation.findings)
        assert verification.next_state.next_index == entries + inputs["new_entries"]

    def by_hash() -> None:
        attest(lambda: cached_runtime_policy(content_hash))

    def by_text() -> None:
        attest(lambda: load_runtime_policy(policy_text))

    by_hash()
    return {
        "by_hash_s": min(best_of(by_hash, 200) for _ in range(5)),
        "by_text_s": min(best_of(by_text, 5) for _ in range(5)),
    }


def edgetrust_memory(inputs: dict[str, Any], devices: int) -> dict[str, Any]:
    from policies.runtime import load_runtime_policy

    policy_text = Path(inputs["files"]["policy"]).read_bytes()
    gc.collect()
    rss_start = rss_kib()
    tracemalloc.start()
    held = [load_runtime_policy(policy_text)]
    gc.collect()
    traced_one = tracemalloc.get_traced_memory()[0]
    rss_one = rss_kib() - rss_start
    held += [load_runtime_policy(policy_text) for _ in range(devices - 1)]
    gc.collect()
    traced_all = tracemalloc.get_traced_memory()[0]
    rss_all = rss_kib() - rss_start
    tracemalloc.stop()
    assert len({id(policy) for policy in held}) == 1
    return {
        "traced_one": traced_one,
        "traced_all": traced_all,
        "rss_one_kib": rss_one,
        "rss_all_kib": rss_all,
    }


# --- Keylime child (runs on Keylime's interpreter) --------------------------------------------

KEYLIME_CHILD = r"""
import functools, gc, json, sys, time, tracemalloc
from pathlib import Path
from keylime.agentstates import AgentAttestState
from keylime.ima import ast
from keylime.common.algorithms import Hash
from keylime.ima import ima
from keylime.ima.file_signatures import ImaKeyrings

mode, inputs = sys.argv[1], json.loads(sys.argv[2])
files = inputs["files"]

def rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0

def best_of(function, rounds):
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter(); function(); best = min(best, time.perf_counter() - start)
    return best

def restored_state(next_entry, pcr10):
    state = AgentAttestState("bench")
    state.set_boottime(0)
    state.set_ima_pcrs({10: pcr10})
    state.set_next_ima_ml_entry(next_entry)
    state.set_ima_keyrings(ImaKeyrings())
    state.get_pcr_state(10, Hash.SHA256)
    return state

policy_text = Path(files["policy"]).read_text()
result = {}
if mode == "full":
    policy = ima.deserialize_runtime_policy(policy_text)
    body = Path(files["list"]).read_text()
    def full():
        state = AgentAttestState("bench")
        _, failure = ima.process_measurement_list(
            state, body.split("\n"), policy, pcrval=inputs["pcr10_prefix"], hash_alg=Hash.SHA256)
        assert not failure, failure.get_event_ids()
        assert state.get_next_ima_ml_entry() == inputs["entries"]
    start = time.perf_counter(); full(); result["first_s"] = time.perf_counter() - start
    result["warm_s"] = best_of(full, 3)
    result["deserialize_s"] = best_of(lambda: ima.deserialize_runtime_policy(policy_text), 3)
    # The policy check alone: Keylime's ima-ng validator on entries parsed beforehand.
    validator = ast.Validator({ast.ImaNg: functools.partial(ima._validate_ima_ng, None, policy)})
    entries = [ast.Entry(line, validator, pcr_hash_alg=Hash.SHA256) for line in body.split("\n") if line]
    def policy_only():
        for entry in entries:
            assert not entry.mode.is_data_valid(validator)
    result["policy_only_s"] = best_of(policy_only, 7)
elif mode == "incremental":
    delta = Path(files["new"]).read_text()
    prefix = bytes.fromhex(inputs["pcr10_prefix"])
    def attest():
        policy = ima.deserialize_runtime_policy(policy_text)
        state = restored_state(inputs["entries"], prefix)
        _, failure = ima.process_measurement_list(
            state, delta.split("\n"), policy, pcrval=inputs["pcr10_all"], hash_alg=Hash.SHA256)
        assert not failure, failure.get_event_ids()
        assert state.get_next_ima_ml_entry() == inputs["entries"] + inputs["new_entries"]
    attest()
    result["with_deserialize_s"] = min(best_of(attest, 1) for _ in range(5))
elif mode == "memory":
    gc.collect()
    rss_start = rss_kib()
    tracemalloc.start()
    copies = [ima.deserialize_runtime_policy(policy_text)]
    gc.collect()
    result["traced_one"] = tracemalloc.get_traced_memory()[0]
    result["rss_one_kib"] = rss_kib() - rss_start
    copies += [ima.deserialize_runtime_policy(policy_text) for _ in range(3)]
    gc.collect()
    result["traced_four"] = tracemalloc.get_traced_memory()[0]
    result["rss_four_kib"] = rss_kib() - rss_start
    tracemalloc.stop()
print(json.dumps(result))
"""


def run_keylime(keylime_python: Path, mode: str, inputs: dict[str, Any]) -> dict[str, Any]:
    environment = dict(os.environ)
    if QUIET_LOGGING.exists():
        environment["KEYLIME_LOGGING_CONFIG"] = str(QUIET_LOGGING)
    environment.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [str(keylime_python), "-c", KEYLIME_CHILD, mode, json.dumps(inputs)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tempfile.gettempdir(),
        check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"Keylime {mode} run failed:\n{completed.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def run_edgetrust(mode: str, inputs: dict[str, Any], devices: int) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--child-inputs",
            json.dumps(inputs),
            "--devices",
            str(devices),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"edgetrust {mode} run failed:\n{completed.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


# --- report -----------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def ratio(keylime: float, edgetrust: float) -> str:
    return f"{keylime / edgetrust:,.0f}×" if edgetrust > 0 else "n/a"


def build_table(inputs: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any], devices: int) -> str:
    entries, new, digests = inputs["entries"], inputs["new_entries"], inputs["digests"]
    full, incr, mem = ours["full"], ours["incremental"], ours["memory"]
    k_full, k_incr, k_mem = theirs["full"], theirs["incremental"], theirs["memory"]
    per_copy = (k_mem["traced_four"] - k_mem["traced_one"]) / 3
    rows = [
        ("measurement", "edgetrust", "Keylime 7.14.3", "Keylime / edgetrust"),
        (
            f"first full evaluation, {entries:,} entries, {digests:,}-digest policy (fresh process)",
            fmt_time(full["first_s"]),
            fmt_time(k_full["first_s"]),
            ratio(k_full["first_s"], full["first_s"]),
        ),
        (
            "same, best of 3 warm runs",
            fmt_time(full["warm_s"]),
            fmt_time(k_full["warm_s"]),
            ratio(k_full["warm_s"], full["warm_s"]),
        ),
        (
            f"policy check alone, {entries:,} entries parsed beforehand",
            fmt_time(full["evaluate_only_s"]),
            fmt_time(k_full["policy_only_s"]),
            ratio(k_full["policy_only_s"], full["evaluate_only_s"]),
        ),
        (
            f"policy loading ({inputs['policy_bytes'] / 1e6:.1f} MB JSON): edgetrust once per content "
            "(validate, compile), Keylime per quote (deserialize)",
            fmt_time(full["compile_s"]),
            fmt_time(k_full["deserialize_s"]),
            "",
        ),
        (
            f"incremental: {new} new entries with per-attestation policy loading "
            "(edgetrust: cache hit by content hash)",
            fmt_time(incr["by_hash_s"]),
            fmt_time(k_incr["with_deserialize_s"]),
            ratio(k_incr["with_deserialize_s"], incr["by_hash_s"]),
        ),
        (
            f"same, edgetrust given the policy text "
            f"(SHA-256 of {inputs['policy_bytes'] / 1e6:.1f} MB, cache hit)",
            fmt_time(incr["by_text_s"]),
            "",
            ratio(k_incr["with_deserialize_s"], incr["by_text_s"]),
        ),
        (
            "policy memory, 1 device (tracemalloc; RSS growth)",
            f"{fmt_mib(mem['traced_one'])}; {fmt_mib(mem['rss_one_kib'] * 1024)}",
            f"{fmt_mib(k_mem['traced_one'])}; {fmt_mib(k_mem['rss_one_kib'] * 1024)}",
            "",
        ),
        (
            f"policy memory, {devices} devices (tracemalloc; RSS growth)",
            f"{fmt_mib(mem['traced_all'])}; {fmt_mib(mem['rss_all_kib'] * 1024)}",
            f"{fmt_mib(per_copy * devices)} (estimate: {devices} × one copy, "
            f"measured 1 and 4 copies: {fmt_mib(k_mem['traced_one'])}, {fmt_mib(k_mem['traced_four'])})",
            "",
        ),
    ]
    lines = []
    for number, row in enumerate(rows):
        lines.append("| " + " | ".join(row) + " |")
        if number == 0:
            lines.append("|---|---|---|---|")
    return "\n".join(lines)


def target_text(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Return a paragraph that says whether this run met the targets of 10 times Keylime."""
    first = theirs["full"]["first_s"] / ours["full"]["first_s"]
    warm = theirs["full"]["warm_s"] / ours["full"]["warm_s"]
    incremental = theirs["incremental"]["with_deserialize_s"] / ours["incremental"]["by_hash_s"]
    met = min(first, warm, incremental) >= 10
    return textwrap.fill(
        f"Targets: the first full evaluation and the incremental one at least 10 times as fast as "
        f"Keylime's, and memory that does not grow with the number of devices sharing a policy. "
        f"This run gave {first:.1f} times for the first full evaluation in a fresh process, "
        f"{warm:.1f} times warm and {incremental:,.0f} times for the incremental one, so the "
        f"speed targets were {'met' if met else 'not met'}; the memory rows show the third.",
        width=95,
    )


def section_text(table: str, command: str, targets: str) -> str:
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    return f"""{SECTION_TITLE}

edgetrust's runtime policy evaluation beside Keylime 7.14.3 (`keylime.ima.ima`) on the same
synthetic inputs: an `ima-ng` list with SHA-256 file digests and a runtime policy that allows
every entry plus unrelated digests. Each side runs in processes of its own, and Keylime runs in
its own virtual environment with WARNING-level logging. The edgetrust figures for a full and an
incremental evaluation include parsing the list, checking template hashes and replaying PCR 10,
as Keylime's `process_measurement_list` does. The script's docstring defines every row.

{table}

{targets}

Machine: {machine}, this workplace's build machine. Figures from one run of

```sh
{command}
```

How to read them:

- A full evaluation parses the list, checks template hashes, replays PCR 10 and checks the
  policy. Each of these runs in C for the bulk of a list (`evidence/ima/_accel.c`), with the
  replay's hashing split over two threads for lists of 4,096 entries or more; the section
  "IMA measurement lists" gives the one-thread figure. The Python code stays the reference
  for every line the C code does not take.
- Per attestation, edgetrust finds the compiled policy by content hash, where Keylime's
  pull-mode verifier parses the whole policy again. That makes incremental evaluation
  thousands of times as fast.
- The policy is compiled once and shared, so memory does not grow with the number of devices.
  RSS grows more than tracemalloc shows because the allocator keeps memory freed after the
  JSON text was parsed once. Keylime's verifier holds one parsed copy per attestation in flight.
- Other work on the shared machine slows whole runs: two runs on the same day differed by up
  to 2 times. Compare the columns of one run rather than figures across runs.
"""


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text.rstrip("\n") + "\n")


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keylime-python", type=Path, default=REPO_ROOT / ".venv-keylime" / "bin" / "python")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--extra-digests", type=int, default=100_000)
    parser.add_argument("--new-entries", type=int, default=20)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument(
        "--write-docs", action="store_true", help="Replace this section of docs/benchmarks.md."
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-inputs", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    # The children run in other directories, so a relative interpreter path would not resolve.
    arguments.keylime_python = arguments.keylime_python.absolute()

    if arguments.child:
        inputs = json.loads(arguments.child_inputs)
        children = {
            "full": lambda: edgetrust_full(inputs),
            "incremental": lambda: edgetrust_incremental(inputs),
            "memory": lambda: edgetrust_memory(inputs, arguments.devices),
        }
        print(json.dumps(children[arguments.child]()))
        return

    if not arguments.keylime_python.exists():
        raise SystemExit(
            f"Keylime's interpreter {arguments.keylime_python} is missing; "
            "build it with scripts/setup-keylime.sh"
        )

    with tempfile.TemporaryDirectory(prefix="bench-policy-") as work:
        print("writing inputs ...", file=sys.stderr)
        inputs = make_inputs(Path(work), arguments.entries, arguments.new_entries, arguments.extra_digests)
        ours: dict[str, Any] = {}
        theirs: dict[str, Any] = {}
        for mode in ("full", "incremental", "memory"):
            print(f"edgetrust {mode} ...", file=sys.stderr)
            ours[mode] = run_edgetrust(mode, inputs, arguments.devices)
            print(f"keylime {mode} ...", file=sys.stderr)
            theirs[mode] = run_keylime(arguments.keylime_python, mode, inputs)

    table = build_table(inputs, ours, theirs, arguments.devices)
    print(table)
    if arguments.write_docs:
        command = "PYTHONPATH=. .venv/bin/python bench/bench_policy.py " + " ".join(
            shlex.quote(argument) for argument in sys.argv[1:]
        )
        write_docs(section_text(table, command.strip(), target_text(ours, theirs)))


if __name__ == "__main__":
    main()
