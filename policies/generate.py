"""Create runtime policies from a directory tree, an IMA measurement list or a DonkeyCar car.

Every digest is what IMA records for the file: the hash of its content with the chosen
algorithm. Paths are recorded as they will appear in the device's IMA measurement list, so a
staged tree (an image being built) is mapped onto the device's file system with ``prefix``:
the device path of the directory given. IMA logs a space in a file name as ``_``, so recorded
names use ``_`` too.

Public API::

    policy_from_directory(directory, *, prefix=None, algorithm="sha256", excludes=())
        -> GeneratedPolicy
    policy_from_measurement_list(entries, *, template_hash_algorithm="sha1") -> GeneratedPolicy
    policy_from_donkeycar(car_directory, *, prefix=None, algorithm="sha256", excludes=(),
                          distribution="donkeycar") -> GeneratedPolicy
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from policies.errors import POLICY_SOURCE_INVALID, PolicyError
from policies.imasig import try_load_buffer_key
from policies.runtime.document import (
    GENERATOR_UNKNOWN,
    LOG_HASH_ALGORITHMS,
    empty_policy_document,
    normalize_excludes,
    normalize_policy_document,
)
from policies.runtime.evaluate import MeasuredEntry

logger = logging.getLogger(__name__)

FILE_DIGEST_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")

# Files under a DonkeyCar car directory that the drive loop reads as code, configuration or
# models. data/ (recorded tubs) and logs/ change while the car drives and are not listed.
DONKEYCAR_SKIPPED_DIRECTORIES = frozenset({"data", "logs", "__pycache__", ".git"})
DONKEYCAR_CONFIG_SUFFIXES = frozenset({".py", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg"})
# .json covers the linear pilot's weights (models/pilot.json) of `edgetrust car init`.
DONKEYCAR_MODEL_SUFFIXES = frozenset(
    {".h5", ".keras", ".tflite", ".onnx", ".pt", ".pth", ".ckpt", ".trt", ".engine", ".pb", ".json"}
)


@dataclass
class GeneratedPolicy:
    """A created runtime policy document and the files that could not be included."""

    document: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(local path, reason) of each file left out, such as an unreadable one."""


def policy_from_directory(
    directory: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    algorithm: str = "sha256",
    excludes: Sequence[str] = (),
) -> GeneratedPolicy:
    """Hash every regular file under ``directory`` into a runtime policy.

    ``prefix`` is the device path of ``directory`` (``/`` for a staged root file system);
    without it the directory's absolute path here is used. Files whose device path matches
    an exclude are not hashed, and the excludes go into the policy. Symbolic links are not
    followed, because IMA records the file a link resolves to under that file's own path.
    Unreadable files are skipped with a warning.
    """
    _check_algorithm(algorithm)
    root = _existing_directory(directory)
    mapper = _PathMapper(root, prefix)
    exclude_list = normalize_excludes(list(excludes), "excludes")
    excluded = _compile_excludes(exclude_list)
    generated = GeneratedPolicy(_new_document(excludes=exclude_list))
    digests = generated.document["digests"]

    for local_path in _walk_files(root, generated):
        device_path = mapper.device_path(local_path)
        if excluded(device_path):
            continue
        _add_file_digest(digests, generated, local_path, device_path, algorithm)

    generated.document = normalize_policy_document(generated.document)
    return generated


def policy_from_measurement_list(
    entries: Iterable[MeasuredEntry], *, template_hash_algorithm: str = "sha1"
) -> GeneratedPolicy:
    """Allow every file, key and buffer that a measured list shows, ``boot_aggregate`` included.

    Use a list taken from a device in a known-good state. Violations are left out. An
    ``ima-buf`` entry whose buffer contains a key goes under ``keyrings[<name>]``, any other one
    under ``ima-buf[<name>]``.
    """
    if template_hash_algorithm not in LOG_HASH_ALGORITHMS:
        raise PolicyError(
            f"template hash algorithm {template_hash_algorithm!r} cannot be a policy's "
            f"log_hash_alg; expected one of {', '.join(LOG_HASH_ALGORITHMS)}",
            code=POLICY_SOURCE_INVALID,
        )
    document = _new_document()
    document["ima"]["log_hash_alg"] = template_hash_algorithm
    generated = GeneratedPolicy(document)

    for entry in entries:
        if not any(entry.template_hash):
            continue
        if entry.template == "ima-buf":
            table = _buffer_table(document, entry.buffer or b"")
        else:
            table = document["digests"]
        table.setdefault(entry.path, []).append(entry.digest.hex())

    generated.document = normalize_policy_document(document)
    return generated


def policy_from_donkeycar(
    car_directory: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    algorithm: str = "sha256",
    excludes: Sequence[str] = (),
    distribution: str = "donkeycar",
) -> GeneratedPolicy:
    """Create a policy for a DonkeyCar car and the installed ``donkeycar`` package.

    The car directory (made by ``donkey createcar``) gives its Python files and configuration:
    ``manage.py``, ``config.py``, ``myconfig.py``, ``train.py``, JSON and YAML files. It also
    gives the model files under ``models/`` that the drive loop loads: ``.h5``, ``.tflite``,
    ``.onnx``, ``.pth`` and the like, the JSON weights of the ``edgetrust car`` pilot, and every
    file inside a ``*.savedmodel`` directory.
    ``data/`` and ``logs/`` are left out because the car writes them while it drives.

    From the package: every file that its installation record lists, found through
    ``importlib.metadata`` without importing it, at the path it has here.
    NOTE: the package files are recorded at their paths on this machine, so generate the
    policy from an environment laid out as on the device (the device image's build stage).
    """
    _check_algorithm(algorithm)
    car = _existing_directory(car_directory)
    mapper = _PathMapper(car, prefix)
    exclude_list = normalize_excludes(list(excludes), "excludes")
    excluded = _compile_excludes(exclude_list)
    generated = GeneratedPolicy(_new_document(excludes=exclude_list))
    digests = generated.document["digests"]

    for local_path in _donkeycar_car_files(car, generated):
        device_path = mapper.device_path(local_path)
        if not excluded(device_path):
            _add_file_digest(digests, generated, local_path, device_path, algorithm)

    for local_path in distribution_files(distribution):
        device_path = _ima_name(str(local_path))
        if not excluded(device_path):
            _add_file_digest(digests, generated, local_path, device_path, algorithm)

    generated.document = normalize_policy_document(generated.document)
    return generated


def distribution_files(name: str) -> list[Path]:
    """Return the regular files that an installed distribution's record lists.

    Raises PolicyError with code ``policy-source-invalid`` if the distribution is not
    installed or has no file record.
    """
    try:
        distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise PolicyError(
            f"Python distribution {name!r} is not installed in this environment; install it "
            "(pip install) or pass the car directory only",
            code=POLICY_SOURCE_INVALID,
        ) from None
    recorded = distribution.files
    if recorded is None:
        raise PolicyError(
            f"Python distribution {name!r} has no file record (RECORD) to list its files from",
            code=POLICY_SOURCE_INVALID,
        )
    paths = []
    for recorded_file in recorded:
        local = Path(str(distribution.locate_file(recorded_file))).resolve()
        if local.is_file():
            paths.append(local)
    return sorted(set(paths))


def file_digest(path: str | os.PathLike[str], algorithm: str) -> bytes:
    """Return the digest IMA records for a file: the hash of its content."""
    _check_algorithm(algorithm)
    with open(path, "rb") as file:
        return hashlib.file_digest(file, algorithm).digest()


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in FILE_DIGEST_ALGORITHMS:
        raise PolicyError(
            f"file digest algorithm {algorithm!r} is not supported, expected one of "
            f"{', '.join(FILE_DIGEST_ALGORITHMS)}",
            code=POLICY_SOURCE_INVALID,
        )


class _PathMapper:
    """Maps a local path under ``root`` to its path on the device."""

    def __init__(self, root: Path, prefix: str | None) -> None:
        self.root = root
        if prefix is None:
            self.prefix = PurePosixPath(root.as_posix())
        else:
            if not prefix.startswith("/"):
                raise PolicyError(
                    f"prefix {prefix!r} must be an absolute device path such as / or /opt/app",
                    code=POLICY_SOURCE_INVALID,
                )
            self.prefix = PurePosixPath(prefix)

    def device_path(self, local_path: Path) -> str:
        relative = PurePosixPath(local_path.relative_to(self.root).as_posix())
        return _ima_name(str(self.prefix / relative))


def _ima_name(path: str) -> str:
    return path.replace(" ", "_")


def _existing_directory(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory).absolute()
    if not path.is_dir():
        raise PolicyError(f"{path} is not a directory", code=POLICY_SOURCE_INVALID)
    return path


def _new_document(*, excludes: list[str] | None = None) -> dict[str, Any]:
    document = empty_policy_document(GENERATOR_UNKNOWN)
    document["meta"]["timestamp"] = dt.datetime.now(dt.UTC).isoformat()
    document["excludes"] = list(excludes or [])
    return document


def _compile_excludes(excludes: list[str]) -> Any:
    if not excludes:
        return lambda path: False
    pattern = re.compile("|".join(f"(?:{exclude})" for exclude in excludes))
    return pattern.match


def _walk_files(root: Path, generated: GeneratedPolicy) -> Iterator[Path]:
    def on_error(error: OSError) -> None:
        _skip(generated, error.filename or str(root), error.strerror or str(error))

    for directory, subdirectories, files in os.walk(root, onerror=on_error):
        subdirectories.sort()
        for name in sorted(files):
            path = Path(directory, name)
            try:
                mode = path.lstat().st_mode
            except OSError as exc:
                _skip(generated, str(path), exc.strerror or str(exc))
                continue
            if stat.S_ISREG(mode):
                yield path


def _donkeycar_car_files(car: Path, generated: GeneratedPolicy) -> Iterator[Path]:
    for path in _walk_files(car, generated):
        parts = path.relative_to(car).parts
        if DONKEYCAR_SKIPPED_DIRECTORIES.intersection(parts[:-1]):
            continue
        if parts[0] == "models" and len(parts) > 1:
            in_saved_model = any(part.endswith(".savedmodel") for part in parts[1:-1])
            if in_saved_model or path.suffix in DONKEYCAR_MODEL_SUFFIXES:
                yield path
        elif path.suffix in DONKEYCAR_CONFIG_SUFFIXES:
            yield path


def _add_file_digest(
    digests: dict[str, list[str]],
    generated: GeneratedPolicy,
    local_path: Path,
    device_path: str,
    algorithm: str,
) -> None:
    try:
        digest = file_digest(local_path, algorithm)
    except OSError as exc:
        _skip(generated, str(local_path), exc.strerror or str(exc))
        return
    digests.setdefault(device_path, []).append(digest.hex())


def _buffer_table(document: dict[str, Any], buffer: bytes) -> dict[str, list[str]]:
    try:
        key = try_load_buffer_key(buffer)
    except PolicyError:
        # A certificate with a key type IMA signatures cannot use: list it as a key anyway,
        # since evaluation rejects such keys on their own.
        key_table: dict[str, list[str]] = document["keyrings"]
        return key_table
    table: dict[str, list[str]] = document["keyrings"] if key is not None else document["ima-buf"]
    return table


def _skip(generated: GeneratedPolicy, path: str, reason: str) -> None:
    logger.warning("skipped %s: %s", path, reason)
    generated.skipped.append((path, reason))
