"""The end-to-end demonstration behind ``edgetrust demo``.

It runs the real programs as a fleet would, all on 127.0.0.1. ``edgetrust serve`` runs on an
embedded SQLite database, and a local OCI registry serves a signed car image. The emulated
device is swtpm, provisioned with EK certificates by a local CA. Its ``edgetrust agent``
enrolls, and its IMA simulator measures a DonkeyCar car and the installed donkeycar package.
The car drives under ``edgetrust guard``. The demo then changes the car's model file and shows
how the verdict, the guard, the rollout gate and the admission webhook react.

``edgetrust.demo_car`` has the steps from the agent service on; ``edgetrust.demo_support`` the
state and helpers they share. Every process and file the demo makes lives under one temporary
directory. Processes are stopped and the directory is removed at the end, also after a failed
step, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device.emulator import EmulatorError, LocalCa, SwtpmProcess, missing_tools, provision_tpm_state
from edgetrust import demo_car
from edgetrust.demo_registry import REGISTRY_BINARY, RegistryError, registry_available
from edgetrust.demo_support import (
    POLL_INTERVAL_SECONDS,
    VERDICT_LIFETIME_INTERVALS,
    DemoContext,
    DemoFailed,
    api_get,
    environment,
    free_port,
    read_log,
    run_checked,
    say,
    spawn,
    wait_for,
)

SERVER_START_TIMEOUT_SECONDS = 60.0
AGENT_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0
KEYLIME_API = "v2.5"
EXIT_INTERRUPTED = 130


class DemoInterrupted(BaseException):
    """SIGINT or SIGTERM arrived while a step ran."""


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[DemoContext], None]


def run_demo(out: TextIO = sys.stdout, keep: bool = False) -> int:
    """Run every step in order. Return 0 only if each behaved as described, 1 after a failed
    step and 130 after SIGINT or SIGTERM."""
    missing = missing_requirements()
    if missing:
        print(f"edgetrust demo cannot run: missing {'; '.join(missing)}. `bash scripts/setup.sh` "
              "installs them.", file=out, flush=True)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="edgetrust-demo-")).resolve()
    context = DemoContext(workdir=workdir, out=out)
    previous_handlers = _install_stop_handlers()
    started = time.monotonic()
    status = 0
    try:
        status = _run_steps(context)
        if status == 0:
            print(f"Demo finished in {time.monotonic() - started:.0f} s: every step behaved as "
                  "described.", file=out, flush=True)
    except (DemoInterrupted, KeyboardInterrupt) as exc:
        name = exc.args[0] if isinstance(exc, DemoInterrupted) else "SIGINT"
        print(f"Interrupted by {name}; stopping everything the demo started.", file=out, flush=True)
        status = EXIT_INTERRUPTED
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave processes behind.
        _ignore_stop_signals(previous_handlers)
        cleanup(context, keep=keep)
        _restore_handlers(previous_handlers)
    return status


def missing_requirements() -> list[str]:
    """Return what the demo needs and this machine lacks, each with where it comes from."""
    missing = [f"{tool} (Debian package swtpm-tools or swtpm)" for tool in missing_tools()]
    if not registry_available():
        missing.append(f"{REGISTRY_BINARY} (Debian package docker-registry)")
    for module, package in (("tpm2_pytss", "tpm2-pytss"), ("donkeycar", "donkeycar")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {package} (pip install -e '.[device,demo]')")
    return missing


def _run_steps(context: DemoContext) -> int:
    for number, step in enumerate(STEPS, start=1):
        print(f"[{number}/{len(STEPS)}] {step.title}", file=context.out, flush=True)
        try:
            with progress(context.out):
                step.run(context)
        except DemoFailed as exc:
            print(f"      FAILED: {exc}", file=context.out, flush=True)
            _print_logs(context)
            return 1
        # KeyError and ValueError: a response whose JSON lacks a field or is not JSON.
        except (EmulatorError, RegistryError, requests.RequestException, OSError, KeyError,
                ValueError) as exc:
            print(f"      FAILED: {exc.__class__.__name__}: {exc}", file=context.out, flush=True)
            _print_logs(context)
            return 1
    return 0


@contextmanager
def progress(out: TextIO, after_seconds: float = 1.0) -> Iterator[None]:
    """Print the elapsed time every second while a step runs longer than ``after_seconds``."""
    done = threading.Event()
    started = time.monotonic()

    def report() -> None:
        if done.wait(after_seconds):
            return
        while not done.wait(1.0):
            print(f"      ... {time.monotonic() - started:.0f} s", file=out, flush=True)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


# --- steps: the server and enrollment ------------------------------------------------------------


def provision_device(context: DemoContext) -> None:
    ca = LocalCa.create(context.workdir / "ca")
    provisioned = provision_tpm_state(context.workdir / "device-tpm", ca)
    context.ca_bundle = ca.write_bundle(context.data_dir / "ek-ca")
    say(context, f"EK certificates: {provisioned.ek_rsa2048_certificate.name}, "
                 f"{provisioned.ek_ecc_p384_certificate.name}; CA bundle in {context.ca_bundle}")


def start_server(context: DemoContext) -> None:
    assert context.registry is not None
    port = free_port()
    context.server_url = f"http://127.0.0.1:{port}"
    client_certificate, client_key = _write_verifier_tls(context.tls_dir)
    context.server_environment = environment({
        "EDGETRUST_DATA_DIR": str(context.data_dir),
        "EDGETRUST_LISTEN_HOST": "127.0.0.1",
        "EDGETRUST_LISTEN_PORT": str(port),
        "EDGETRUST_VERIFIER_POLL_INTERVAL": str(POLL_INTERVAL_SECONDS),
        "EDGETRUST_VERIFIER_VERDICT_LIFETIME_INTERVALS": str(VERDICT_LIFETIME_INTERVALS),
        "EDGETRUST_VERIFIER_TLS_CERT": str(client_certificate),
        "EDGETRUST_VERIFIER_TLS_KEY": str(client_key),
        "EDGETRUST_REGISTRY_PLAIN_HTTP": context.registry.host,
        # The server notices a verdict stream whose client left only when it next writes to
        # it, and stopping waits for open streams, so the demo's server writes one often.
        "EDGETRUST_TRUST_STREAM_HEARTBEAT": "2",
    })
    server = spawn(context, "server", ["serve"], context.server_environment)
    wait_for(lambda: _healthy(context.server_url, server), SERVER_START_TIMEOUT_SECONDS,
             f"the server did not answer on {context.server_url}/healthz")
    say(context, f"server listening on {context.server_url}, database "
                 f"{context.data_dir / 'edgetrust.db'}")
    say(context, f"the verifier attests every {POLL_INTERVAL_SECONDS:g} s; a passing attestation "
                 f"keeps a device trusted for {POLL_INTERVAL_SECONDS * VERDICT_LIFETIME_INTERVALS:g} s")
    say(context, f"it reaches agents over mutual TLS with the client certificate {client_certificate}")
    say(context, f"it reads images from the registry {context.registry.host} over plain HTTP")

    context.api_token = _create_token(context, "demo", "admin")
    context.read_token = _create_token(context, "car-guard", "read")
    _write_private_file(context.read_token_file, context.read_token + "\n")
    say(context, "created the admin API token 'demo' and the read token 'car-guard' (in "
                 f"{context.read_token_file.name}) with `edgetrust token create`")


def start_tpm(context: DemoContext) -> None:
    context.swtpm = SwtpmProcess(context.workdir / "device-tpm" / "state").start()
    say(context, f"TPM reachable with TCTI {context.swtpm.tcti}")


def enroll_device(context: DemoContext) -> None:
    result = _run_agent_once(context, context.workdir / "agent-state", "enroll")
    if result != 0:
        raise DemoFailed(f"edgetrust agent --once exited with status {result}; expected 0")
    say(context, f"device {context.device_id} registered and activated its credential")


def show_registration(context: DemoContext) -> None:
    listing = api_get(context, f"/{KEYLIME_API}/agents/")
    uuids = listing["results"].get("uuids", [])
    if context.device_id not in uuids:
        raise DemoFailed(f"registrar lists {uuids}; expected {context.device_id} among them")
    device = api_get(context, f"/{KEYLIME_API}/agents/{context.device_id}")["results"]
    say(context, f"registrar lists {uuids}")
    say(context, f"regcount {device.get('regcount')}, contact {device.get('ip')}:"
                 f"{device.get('port')}, EK certificate {'present' if device.get('ekcert') else 'absent'}")


def reject_takeover(context: DemoContext) -> None:
    # A second agent state directory makes a new AK under the same EK for the same uuid.
    result = _run_agent_once(context, context.workdir / "intruder-state", "intruder")
    if result == 0:
        raise DemoFailed("a registration with a new AK for a known uuid was accepted")
    if "identity-mismatch" not in read_log(context, "intruder"):
        raise DemoFailed("the agent was rejected, but not with identity-mismatch; see "
                         f"{context.log_path('intruder')}")
    say(context, "registrar rejected the new AK with 403 identity-mismatch, as it must")


def _run_agent_once(context: DemoContext, state_dir: Path, log_name: str) -> int:
    process = spawn(context, log_name, ["agent", "--once"], demo_car.agent_environment(context, state_dir))
    try:
        return process.wait(AGENT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise DemoFailed(f"edgetrust agent did not finish in {AGENT_TIMEOUT_SECONDS:.0f} s") from exc


def _create_token(context: DemoContext, name: str, scope: str) -> str:
    result = run_checked(["token", "create", "--name", name, "--scope", scope],
                         context.server_environment)
    return result.stdout.strip()


def _healthy(url: str, server: subprocess.Popen[bytes]) -> bool:
    if server.poll() is not None:
        raise DemoFailed(f"the server exited with status {server.returncode} while starting")
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _write_verifier_tls(directory: Path) -> tuple[Path, Path]:
    """Make a CA and a verifier client certificate it issued (ECDSA P-256, valid one day).

    The agent requires a client certificate from this CA (agent_client_ca), and the verifier
    presents the certificate (verifier_tls_cert, verifier_tls_key). Returns the certificate
    and key files; the CA is ``ca.pem`` beside them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetrust demo verifier CA")])
    ca_certificate = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetrust demo verifier")]))
        .issuer_name(ca_name).public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    certificate_file = directory / "verifier.pem"
    key_file = directory / "verifier-key.pem"
    certificate_file.write_bytes(client_certificate.public_bytes(serialization.Encoding.PEM))
    _write_private_file(key_file, client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode("ascii"))
    return certificate_file, key_file


def _write_private_file(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)


# --- stopping ------------------------------------------------------------------------------------


def cleanup(context: DemoContext, *, keep: bool) -> None:
    """Stop every process the demo started, newest first, then remove its directory."""
    for process in reversed(context.processes):
        _stop_process_group(process)
    for pid in context.car_pids:
        # The guard stops the car it started. This stops a car whose guard was killed.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if context.swtpm is not None:
        context.swtpm.stop()
    if context.registry is not None:
        context.registry.stop()
    if keep:
        print(f"Kept {context.workdir}", file=context.out)
    else:
        shutil.rmtree(context.workdir, ignore_errors=True)


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """Send SIGTERM to the process group that ``spawn`` made for ``process``, and SIGKILL
    after STOP_TIMEOUT_SECONDS if the leader still runs."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    # Children of the leader, such as gunicorn's worker, may outlive it, so the group gets
    # SIGKILL even after the leader exited.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(STOP_TIMEOUT_SECONDS)


Handlers = dict[int, Any]


def _install_stop_handlers() -> Handlers:
    """Turn SIGTERM into DemoInterrupted so that cleanup runs, as SIGINT's KeyboardInterrupt
    does. Only the main thread can install signal handlers, so other threads get none."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signal_number: int, _frame: FrameType | None) -> None:
        raise DemoInterrupted(signal.Signals(signal_number).name)

    previous: Handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, interrupt)
    return previous


def _ignore_stop_signals(previous: Handlers) -> None:
    for number in previous:
        signal.signal(number, signal.SIG_IGN)


def _restore_handlers(previous: Handlers) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


def _print_logs(context: DemoContext) -> None:
    paths = sorted(context.workdir.glob("*.log"))
    if context.registry is not None:
        paths.append(context.registry.log_path)
    for path in paths:
        if not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()[-15:]
        print(f"      --- last lines of {path.name}:", file=context.out)
        for line in lines:
            print(f"      {line}", file=context.out)


# --- the steps in order ----------------------------------------------------------------------------

STEPS = (
    Step("Provision an emulated TPM with EK certificates from a local CA", provision_device),
    Step("Create the car with `edgetrust car init`", demo_car.create_car),
    Step("Start a local OCI registry and push a signed car image", demo_car.start_registry),
    Step("Start the server on an embedded SQLite database", start_server),
    Step("Start the device's TPM (swtpm on 127.0.0.1)", start_tpm),
    Step("Enroll the device: EK certificate, AK, credential activation", enroll_device),
    Step("Show the device as the registrar recorded it", show_registration),
    Step("Reject an identity takeover: same uuid, new AK", reject_takeover),
    Step("Start the device agent: IMA simulator over the car and donkeycar, agent API over mTLS",
         demo_car.start_agent),
    Step("Create the runtime policy from the car and upload the policies", demo_car.upload_policies),
    Step("Add the device to the verifier and wait for a trusted verdict", demo_car.add_to_verifier),
    Step("Start the car under the guard", demo_car.start_car),
    Step("Ask the rollout gate and the admission webhook about the signed image",
         demo_car.check_allowed),
    Step("Change the car's model file: the verdict turns untrusted", demo_car.change_model),
    Step("The guard stops the car; the rollout gate and the admission webhook deny",
         demo_car.check_denied),
)
