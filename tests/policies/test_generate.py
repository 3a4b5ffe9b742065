"""Creation of runtime policies from directories, IMA lists and DonkeyCar cars."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import pytest

from policies import generate
from policies.errors import PolicyError
from policies.generate import (
    distribution_files,
    policy_from_directory,
    policy_from_donkeycar,
    policy_from_measurement_list,
)
from policies.runtime import evaluate, parse_runtime_policy
from tests.policies import imalist
from tests.policies.keys import certificate_der, ec_key


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def staged_root(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    write(root / "usr" / "bin" / "app", b"\x7fELF app")
    write(root / "etc" / "app.conf", b"threshold = 3\n")
    write(root / "opt" / "my model" / "weights.bin", b"\x00\x01\x02")
    write(root / "var" / "log" / "app.log", b"changes all the time")
    (root / "usr" / "bin" / "app-link").symlink_to("app")
    return root


def test_directory_files_are_hashed_under_prefix(staged_root: Path) -> None:
    document = policy_from_directory(staged_root, prefix="/").document

    assert document["digests"] == {
        "/etc/app.conf": [hashlib.sha256(b"threshold = 3\n").hexdigest()],
        "/opt/my_model/weights.bin": [hashlib.sha256(b"\x00\x01\x02").hexdigest()],
        "/usr/bin/app": [hashlib.sha256(b"\x7fELF app").hexdigest()],
        "/var/log/app.log": [hashlib.sha256(b"changes all the time").hexdigest()],
    }


def test_directory_without_prefix_uses_absolute_paths(staged_root: Path) -> None:
    document = policy_from_directory(staged_root / "etc").document

    assert list(document["digests"]) == [f"{(staged_root / 'etc').as_posix()}/app.conf"]


def test_directory_with_sha1_digests(staged_root: Path) -> None:
    document = policy_from_directory(staged_root, prefix="/", algorithm="sha1").document

    assert document["digests"]["/usr/bin/app"] == [hashlib.sha1(b"\x7fELF app").hexdigest()]


def test_directory_excludes_skip_files_and_enter_policy(staged_root: Path) -> None:
    document = policy_from_directory(staged_root, prefix="/", excludes=["/var/log/", ""]).document

    assert "/var/log/app.log" not in document["digests"]
    assert document["excludes"] == ["/var/log/"]


def test_directory_invalid_exclude_is_rejected(staged_root: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_from_directory(staged_root, excludes=["*"])

    assert caught.value.code == "policy-exclude-invalid"


def test_unreadable_file_is_skipped_with_warning(
    staged_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_digest = generate.file_digest

    def refuse_conf(path: str | os.PathLike[str], algorithm: str) -> bytes:
        if str(path).endswith("app.conf"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_digest(path, algorithm)

    monkeypatch.setattr(generate, "file_digest", refuse_conf)

    generated = policy_from_directory(staged_root, prefix="/")

    assert "/etc/app.conf" not in generated.document["digests"]
    assert generated.skipped == [(str(staged_root / "etc" / "app.conf"), "Permission denied")]
    assert "skipped" in caplog.text


def test_generated_policy_passes_matching_list(staged_root: Path) -> None:
    policy = parse_runtime_policy(policy_from_directory(staged_root, prefix="/").document)
    lines = [
        imalist.file_line("/usr/bin/app", b"\x7fELF app"),
        imalist.file_line("/opt/my_model/weights.bin", b"\x00\x01\x02"),
        imalist.file_line("/usr/bin/app", b"\x7fELF patched"),
    ]

    findings = evaluate(imalist.parse(lines), policy)

    assert [finding.context["index"] for finding in findings] == [2]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"prefix": "relative/dir"}, "absolute"), ({"algorithm": "md5"}, "md5")],
)
def test_directory_bad_options_are_rejected(staged_root: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_from_directory(staged_root, **options)  # type: ignore[arg-type]

    assert caught.value.code == "policy-source-invalid"
    assert message in caught.value.message


def test_missing_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_from_directory(tmp_path / "absent")

    assert "not a directory" in caught.value.message


# --- from a measured list ---------------------------------------------------------------------


def test_measurement_list_becomes_policy() -> None:
    certificate = certificate_der(ec_key())
    lines = [
        imalist.ng_line("boot_aggregate", hashlib.sha1(b"pcrs").digest(), algorithm="sha1"),
        imalist.file_line("/usr/bin/app", b"a"),
        imalist.file_line("/usr/bin/app", b"b"),
        imalist.violation_line("/var/lib/db"),
        imalist.sig_line("/usr/bin/signed", hashlib.sha256(b"s").digest(), b""),
        imalist.buf_line(".ima", certificate),
        imalist.buf_line("kernel_version", b"6.1.0"),
    ]
    entries = imalist.parse(lines)

    document = policy_from_measurement_list(entries).document

    assert document["digests"] == {
        "boot_aggregate": [hashlib.sha1(b"pcrs").hexdigest()],
        "/usr/bin/app": sorted([hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]),
        "/usr/bin/signed": [hashlib.sha256(b"s").hexdigest()],
    }
    assert document["keyrings"] == {".ima": [hashlib.sha256(certificate).hexdigest()]}
    assert document["ima-buf"] == {"kernel_version": [hashlib.sha256(b"6.1.0").hexdigest()]}
    assert [finding.code for finding in evaluate(entries, parse_runtime_policy(document))] == [
        "ima-violation"
    ]


def test_measurement_list_template_hash_algorithm_becomes_log_hash_alg() -> None:
    entries = imalist.parse([imalist.file_line("/a", b"a")])

    document = policy_from_measurement_list(entries, template_hash_algorithm="sha256").document

    assert document["ima"]["log_hash_alg"] == "sha256"


def test_fixture_list_policy_includes_boot_aggregate(fixtures_dir: Path) -> None:
    from evidence.ima import parse_ascii_list

    measured = parse_ascii_list((fixtures_dir / "ima" / "rust-keylime-agent.ascii").read_bytes())

    document = policy_from_measurement_list(measured.entries).document

    assert document["digests"]["boot_aggregate"] == ["00" * 20]
    assert evaluate(measured.entries, parse_runtime_policy(document)) == []


# --- DonkeyCar --------------------------------------------------------------------------------


@pytest.fixture
def car(tmp_path: Path) -> Path:
    car = tmp_path / "mycar"
    write(car / "manage.py", b"# drive loop")
    write(car / "config.py", b"DRIVE_LOOP_HZ = 20")
    write(car / "myconfig.py", b"DRIVE_LOOP_HZ = 30")
    write(car / "calibration.json", b"{}")
    write(car / "parts" / "lidar.py", b"# custom part")
    write(car / "models" / "pilot.tflite", b"tflite model")
    write(car / "models" / "pilot.png", b"loss plot")
    write(car / "models" / "big.savedmodel" / "saved_model.pb", b"graph")
    write(car / "models" / "big.savedmodel" / "variables" / "variables.index", b"index")
    write(car / "data" / "tub_1" / "catalog_0.catalog", b"recorded")
    write(car / "data" / "tub_1" / "images" / "0_cam.jpg", b"jpeg")
    write(car / "logs" / "run.log", b"log")
    write(car / "__pycache__" / "config.cpython-311.pyc", b"bytecode")
    return car


def test_donkeycar_car_files_are_listed(car: Path) -> None:
    document = policy_from_donkeycar(car, prefix="/home/pi/mycar", distribution="click").document

    car_paths = sorted(path for path in document["digests"] if path.startswith("/home/pi/mycar/"))
    assert car_paths == [
        "/home/pi/mycar/calibration.json",
        "/home/pi/mycar/config.py",
        "/home/pi/mycar/manage.py",
        "/home/pi/mycar/models/big.savedmodel/saved_model.pb",
        "/home/pi/mycar/models/big.savedmodel/variables/variables.index",
        "/home/pi/mycar/models/pilot.tflite",
        "/home/pi/mycar/myconfig.py",
        "/home/pi/mycar/parts/lidar.py",
    ]
    assert document["digests"]["/home/pi/mycar/models/pilot.tflite"] == [
        hashlib.sha256(b"tflite model").hexdigest()
    ]


def test_donkeycar_package_files_are_listed(car: Path) -> None:
    document = policy_from_donkeycar(car, distribution="click").document
    click_init = Path(importlib.metadata.distribution("click").locate_file("click/__init__.py")).resolve()

    assert document["digests"][click_init.as_posix()] == [hashlib.sha256(click_init.read_bytes()).hexdigest()]


def test_distribution_files_lists_recorded_files() -> None:
    files = distribution_files("click")

    assert any(path.name == "core.py" for path in files)
    assert all(path.is_file() for path in files)


def test_missing_distribution_is_rejected(car: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_from_donkeycar(car, distribution="no-such-distribution-edgetrust")

    assert caught.value.code == "policy-source-invalid"
    assert "not installed" in caught.value.message


def test_real_donkeycar_package_is_listed(car: Path) -> None:
    try:
        distribution = importlib.metadata.distribution("donkeycar")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("donkeycar is not installed in this venv (pip install donkeycar==5.3.0)")
    templates = Path(distribution.locate_file("donkeycar/templates/complete.py")).resolve()

    document = policy_from_donkeycar(car, prefix="/home/pi/mycar").document

    assert templates.as_posix() in document["digests"]
    assert "/home/pi/mycar/manage.py" in document["digests"]
