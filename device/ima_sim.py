"""IMA measurement lists on the device: serving them by entry, and simulating IMA where the
kernel has none.

``MeasurementListFile`` reads an ASCII list (the kernel's ``ascii_runtime_measurements`` or
the simulator's file) from a given entry on. It returns whole lines only, because the kernel
or the simulator may be appending while it reads.

``ImaSimulator`` measures files the way the kernel's IMA does for the ``ima-ng`` template,
for machines without an IMA measurement list (a test bench, a board whose kernel lacks IMA):

- Entry 0 is ``boot_aggregate``: the SHA-256 of PCR 0-9 when the TPM has a SHA-256 bank,
  else the SHA-1 of PCR 0-7 (``evidence.ima.compute_boot_aggregate``).
- Each file gets ``10 <SHA-1 template hash> ima-ng sha256:<file digest> <path>``, the path
  with symbolic links resolved. PCR 10 of every allocated bank is then extended with
  H_bank(template data) in one TPM2_PCR_Extend, line first and extend second, as the kernel
  adds an entry to its list before it extends the TPM.
- A file is hashed again when its size, times or inode changed. As in the kernel, an entry is
  added only if its template hash is not in the list yet, so a file changed back to earlier
  content adds nothing.

The list file is the simulator's whole state. On start (``ImaSimulator.start``) it compares
the list's replay with PCR 10 in every bank:

1. Equal: the agent restarted; continue the list.
2. PCR 10 is zeros in every bank, so the TPM was reset. Keep the old list as
   ``<name>.previous`` and start a new one with a fresh boot_aggregate.
3. A shorter prefix of the list replays to PCR 10: the agent stopped between writing lines and
   extending PCR 10; extend the remaining entries and continue.
4. Anything else (PCR 10 extended by another program, or a list from another TPM) raises
   ImaSimulatorError, because no list written from here on could replay to PCR 10.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from device.attest import AttestationTpm, bank_name, single_bank_selection
from device.errors import DeviceError
from evidence.errors import ParseError
from evidence.ima import (
    BOOT_AGGREGATE_NAME,
    IMA_PCR,
    TEMPLATE_IMA_NG,
    ImaEntry,
    boot_aggregate_pcrs,
    compute_boot_aggregate,
    format_ascii_list,
    parse_ascii_lines,
)
from evidence.ima.ascii import decode_list_text, split_list_lines
from evidence.ima.template_data import TemplateFields, build_template_data
from evidence.tpm import PcrBank, PcrSelection, TpmAlg, digest_size, hash_function

log = logging.getLogger(__name__)

KERNEL_IMA_LIST: Final = Path("/sys/kernel/security/ima/ascii_runtime_measurements")
SIMULATED_LIST_NAME: Final = "ascii_runtime_measurements"
# The kernel's default template hash is SHA-1; ima_hash=sha256 is the usual file hash.
TEMPLATE_HASH_ALGORITHM: Final = "sha1"
FILE_DIGEST_ALGORITHM: Final = "sha256"

_READ_CHUNK: Final = 1 << 16
_MAX_CHECKPOINTS: Final = 64


class ImaSimulatorError(DeviceError):
    """The simulated list and the TPM's PCR 10 cannot be brought into agreement."""

    default_code = "ima-simulator-inconsistent"


# --- Reading a list by entry ---------------------------------------------------------------


@dataclass(frozen=True)
class ListSlice:
    """Whole lines of a list from entry ``start_index`` on, and the list's length then."""

    text: str
    start_index: int
    entry_count: int


class MeasurementListFile:
    """Reads an ASCII IMA measurement list from entry E on, as the Keylime agent API serves it.

    Entry E may be 0 to the number of entries (E equal to the count returns no lines yet). A
    larger E, which a verifier sends after the device rebooted and its list shrank, returns
    the whole list from entry 0, as rust-keylime 0.2.9 does. The byte offsets of entries seen
    before are kept, so a verifier that requests only the newest entries does not make the agent
    read the whole list again. A file replaced by another one (new inode) starts afresh.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None
        # (entry index, byte offset of that entry's line), ascending.
        self._checkpoints: list[tuple[int, int]] = [(0, 0)]

    def read_from(self, entry: int) -> ListSlice:
        """Return the complete lines from ``entry`` on; raise OSError if the file is unreadable."""
        with self._lock:
            self._forget_if_replaced()
            result = self._read_from(entry)
            if result is None:
                result = self._read_from(0)
            assert result is not None  # entry 0 always exists, even in an empty list
            return result

    def _forget_if_replaced(self) -> None:
        status = os.stat(self.path)
        identity = (status.st_dev, status.st_ino)
        # securityfs reports size 0, so only a regular file's size can show a truncation.
        truncated = stat.S_ISREG(status.st_mode) and status.st_size < self._checkpoints[-1][1]
        if identity != self._identity or truncated:
            self._identity = identity
            self._checkpoints = [(0, 0)]

    def _read_from(self, entry: int) -> ListSlice | None:
        position = bisect.bisect_right(self._checkpoints, (entry, float("inf"))) - 1
        first_index, offset = self._checkpoints[position]
        data = _read_to_eof(self.path, offset)
        complete = data[: data.rfind(b"\n") + 1]

        line_starts = [0]
        line_starts.extend(index + 1 for index, byte in enumerate(complete) if byte == 0x0A)
        entry_count = first_index + len(line_starts) - 1
        self._remember(entry_count, offset + len(complete))
        if entry > entry_count:
            return None
        start = line_starts[entry - first_index]
        self._remember(entry, offset + start)
        text = decode_list_text(complete[start:])
        return ListSlice(text=text, start_index=entry, entry_count=entry_count)

    def _remember(self, entry: int, offset: int) -> None:
        checkpoint = (entry, offset)
        position = bisect.bisect_left(self._checkpoints, checkpoint)
        if position < len(self._checkpoints) and self._checkpoints[position] == checkpoint:
            return
        self._checkpoints.insert(position, checkpoint)
        if len(self._checkpoints) > _MAX_CHECKPOINTS:
            del self._checkpoints[1]


def _read_to_eof(path: Path, offset: int) -> bytes:
    """Read from ``offset`` until a read returns nothing (securityfs reports size 0)."""
    chunks: list[bytes] = []
    with path.open("rb", buffering=0) as stream:
        stream.seek(offset)
        while chunk := stream.read(_READ_CHUNK):
            chunks.append(chunk)
    return b"".join(chunks)


# --- The simulator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileState:
    """Stat key and file digest of a path at its last measurement."""

    stat_key: tuple[int, ...]
    digest: bytes


def ima_ng_entry(index: int, digest_algorithm: str, digest: bytes, name: bytes) -> ImaEntry:
    """Build an ``ima-ng`` entry for PCR 10 with a SHA-1 template hash."""
    fields = TemplateFields(digest_algorithm, digest, name, None, None)
    template_data = build_template_data(TEMPLATE_IMA_NG, fields)
    template_hash = hashlib.new(TEMPLATE_HASH_ALGORITHM, template_data).digest()
    return ImaEntry(index, IMA_PCR, template_hash, TEMPLATE_IMA_NG, digest_algorithm, digest,
                    name.decode("utf-8", "surrogateescape"), None, None, template_data)


def entry_line(entry: ImaEntry) -> bytes:
    """Return the entry's line of the ASCII list, newline included, with the name's bytes."""
    return format_ascii_list([entry]).encode("utf-8", "surrogateescape")


def replay_banks(entries: Iterable[ImaEntry], banks: Sequence[TpmAlg],
                 initial: dict[TpmAlg, bytes] | None = None) -> dict[TpmAlg, bytes]:
    """Return PCR 10 of each bank after extending ``initial`` (zeros) with ``entries``."""
    values = {bank: bytes(digest_size(bank)) for bank in banks}
    if initial:
        values.update(initial)
    for entry in entries:
        for bank in banks:
            new_hash = hash_function(bank)
            values[bank] = bytes(new_hash(values[bank] + new_hash(entry.template_data).digest())
                                 .digest())
    return values


def iter_measured_files(paths: Iterable[Path], *, skip: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield each regular file under ``paths`` once, symbolic links resolved, in sorted order.

    Directory trees are walked without following links to directories. A path that does not
    exist is logged at WARNING and skipped.
    """
    skipped = {Path(os.path.realpath(path)) for path in skip}
    seen: set[Path] = set()
    for root in paths:
        if not os.path.lexists(root):
            log.warning("IMA simulator: %s does not exist; nothing measured there", root)
            continue
        for candidate in _walk(root):
            resolved = Path(os.path.realpath(candidate))
            if resolved in seen or resolved in skipped or not resolved.is_file():
                continue
            seen.add(resolved)
            yield resolved


def _walk(root: Path) -> Iterator[Path]:
    if not root.is_dir() or root.is_symlink():
        yield root
        return
    for directory, subdirectories, files in os.walk(root, followlinks=False):
        subdirectories.sort()
        for name in sorted(files):
            yield Path(directory) / name


class ImaSimulator:
    """Measures files into a simulated IMA list and PCR 10 (see the module docstring)."""

    def __init__(self, tpm: AttestationTpm, list_path: Path, paths: Sequence[Path]):
        self.tpm = tpm
        self.list_path = list_path
        self.paths = tuple(paths)
        self._banks: tuple[TpmAlg, ...] = ()
        self._entry_count = 0
        self._template_hashes: set[bytes] = set()
        self._files: dict[Path, _FileState] = {}
        self._measure_lock = threading.Lock()

    @property
    def entry_count(self) -> int:
        return self._entry_count

    # Start: resume, repair or begin the list.

    def start(self) -> None:
        """Bring the list and PCR 10 into agreement (the four cases of the module docstring),
        then measure the configured paths once (TPM2_GetCapability, TPM2_PCR_Read,
        TPM2_PCR_Extend)."""
        with self.tpm.lock:
            self._banks = self.tpm.allocated_banks()
            entries = self._read_existing_list()
            pcr10 = self._read_pcr10()
            self._resume_or_begin(entries, pcr10)
        self.measure()

    def _read_existing_list(self) -> list[ImaEntry] | None:
        """Return the stored list's entries, [] for no list, or None if it does not parse."""
        try:
            data = self.list_path.read_bytes()
        except FileNotFoundError:
            return []
        complete_end = data.rfind(b"\n") + 1
        if complete_end != len(data):
            log.warning("IMA simulator: %s ends with %d bytes of an unfinished line; removing them",
                        self.list_path, len(data) - complete_end)
            with self.list_path.open("r+b") as stream:
                stream.truncate(complete_end)
        lines = split_list_lines(decode_list_text(data[:complete_end]))
        try:
            return list(parse_ascii_lines(lines, template_hash_algorithm=TEMPLATE_HASH_ALGORITHM))
        except ParseError as exc:
            log.warning("IMA simulator: %s does not parse (%s)", self.list_path, exc.message)
            return None

    def _read_pcr10(self) -> dict[TpmAlg, bytes]:
        selection = PcrSelection(tuple(PcrBank(bank, (IMA_PCR,)) for bank in self._banks))
        return {bank: values[IMA_PCR] for bank, values in self.tpm.read_pcrs(selection).items()}

    def _resume_or_begin(self, entries: list[ImaEntry] | None,
                         pcr10: dict[TpmAlg, bytes]) -> None:
        reset = all(not any(value) for value in pcr10.values())
        if entries is not None and entries and replay_banks(entries, self._banks) == pcr10:
            self._adopt(entries)
            log.info("IMA simulator: continuing %s at entry %d; PCR 10 matches the list",
                     self.list_path, len(entries))
            return
        if reset:
            self._begin_new_list(had_list=bool(entries) or entries is None)
            return
        matched = self._matching_prefix(entries or [], pcr10)
        if matched is not None and entries:
            self._complete_interrupted(entries, matched)
            return
        raise ImaSimulatorError(
            f"PCR 10 ({', '.join(f'{bank_name(b)}:{v.hex()}' for b, v in pcr10.items())}) does "
            f"not match any prefix of the IMA list {self.list_path}, and it is not zero, so the "
            "TPM was not reset: another program extends PCR 10, or the list belongs to another "
            "TPM. Restart the TPM (a reboot, or swtpm) to begin a new list.")

    def _matching_prefix(self, entries: list[ImaEntry], pcr10: dict[TpmAlg, bytes]) -> int | None:
        """Return the largest k < len(entries) whose first k entries replay to PCR 10."""
        running = {bank: bytes(digest_size(bank)) for bank in self._banks}
        prefixes = {0: dict(running)}
        for count, entry in enumerate(entries[:-1], start=1):
            running = replay_banks([entry], self._banks, running)
            prefixes[count] = running
        for count in sorted(prefixes, reverse=True):
            if prefixes[count] == pcr10:
                return count
        return None

    def _adopt(self, entries: list[ImaEntry]) -> None:
        self._entry_count = len(entries)
        self._template_hashes = {entry.template_hash for entry in entries}

    def _complete_interrupted(self, entries: list[ImaEntry], matched: int) -> None:
        missing = entries[matched:]
        log.warning("IMA simulator: PCR 10 covers %d of the %d entries in %s (the agent stopped "
                    "while measuring); extending PCR 10 with the other %d", matched,
                    len(entries), self.list_path, len(missing))
        for entry in missing:
            self._extend_pcr10(entry)
        self._adopt(entries)

    def _begin_new_list(self, *, had_list: bool) -> None:
        """Start a new list with boot_aggregate (TPM2_PCR_Read of PCR 0-9, TPM2_PCR_Extend)."""
        if had_list and self.list_path.exists():
            previous = self.list_path.with_name(self.list_path.name + ".previous")
            os.replace(self.list_path, previous)
            log.info("IMA simulator: PCR 10 is zero, so the TPM was reset; kept the old list as "
                     "%s and began a new one", previous)
        self.list_path.parent.mkdir(parents=True, exist_ok=True)
        self.list_path.write_bytes(b"")
        self._entry_count = 0
        self._template_hashes = set()
        self._files = {}
        self._append(self._boot_aggregate_entry())

    def _boot_aggregate_entry(self) -> ImaEntry:
        bank = TpmAlg.SHA256 if TpmAlg.SHA256 in self._banks else TpmAlg.SHA1
        name = bank_name(bank)
        pcrs = self.tpm.read_pcrs(single_bank_selection(bank, boot_aggregate_pcrs(name)))[bank]
        digest = compute_boot_aggregate(name, pcrs)
        return ima_ng_entry(0, name, digest, BOOT_AGGREGATE_NAME.encode())

    # Measuring.

    def measure(self) -> int:
        """Measure every configured file once; return how many entries were added."""
        added = 0
        with self._measure_lock:
            for path in iter_measured_files(self.paths, skip=[self.list_path]):
                try:
                    added += self._measure_file(path)
                except OSError as exc:
                    log.warning("IMA simulator: cannot measure %s: %s", path, exc.strerror or exc)
        if added:
            log.info("IMA simulator: added %d entries to %s (%d in total)", added,
                     self.list_path, self._entry_count)
        return added

    def _measure_file(self, path: Path) -> int:
        status = path.stat()
        stat_key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
                    status.st_ctime_ns)
        known = self._files.get(path)
        if known is not None and known.stat_key == stat_key:
            return 0
        digest = _file_digest(path)
        self._files[path] = _FileState(stat_key, digest)

        name = os.fsencode(path)
        if b"\n" in name:
            log.warning("IMA simulator: not measuring %r, whose name contains a newline", path)
            return 0
        entry = ima_ng_entry(self._entry_count, FILE_DIGEST_ALGORITHM, digest, name)
        if entry.template_hash in self._template_hashes:
            return 0
        self._append(entry)
        return 1

    def _append(self, entry: ImaEntry) -> None:
        """Append the entry's line, then TPM2_PCR_Extend PCR 10 in every bank. Both run under
        the TPM lock, so no quote runs between them."""
        line = entry_line(entry)
        with self.tpm.lock:
            _append_line(self.list_path, line)
            self._extend_pcr10(entry)
            self._template_hashes.add(entry.template_hash)
            self._entry_count += 1

    def _extend_pcr10(self, entry: ImaEntry) -> None:
        digests = {bank: bytes(hash_function(bank)(entry.template_data).digest())
                   for bank in self._banks}
        self.tpm.extend_pcr(IMA_PCR, digests)

    def run(self, stop: threading.Event, interval: float) -> None:
        """Measure again every ``interval`` seconds until ``stop`` is set; a failed pass is
        logged and the next one runs as planned."""
        while not stop.wait(interval):
            try:
                self.measure()
            except DeviceError as exc:
                log.error("IMA simulator: a measuring pass failed [%s]: %s", exc.code, exc.message)


def _file_digest(path: Path) -> bytes:
    digest = hashlib.new(FILE_DIGEST_ALGORITHM)
    with path.open("rb") as stream:
        while chunk := stream.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _append_line(path: Path, line: bytes) -> None:
    """Append one whole line with a single write to a file opened with O_APPEND."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(descriptor, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
