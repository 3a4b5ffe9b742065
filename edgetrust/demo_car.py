"""The steps of ``edgetrust demo`` around the DonkeyCar workload.

They make the car directory and the signed car image, start the agent with its IMA simulator,
upload the policies and add the device to the verifier. Then they drive the car under the
guard, consult the rollout gate and the admission webhook, and show what a changed model file
does to each of them.

Each step prints what it did and raises DemoFailed when something did not behave as
described; ``edgetrust.demo`` runs them in order.
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from pathlib import Path
from typing import Any

from edgetrust.demo_registry import LocalRegistry, generate_signing_key, public_key_pem
from edgetrust.demo_support import (
    POLL_INTERVAL_SECONDS,
    DemoContext,
    DemoFailed,
    api_call,
    api_get,
    edgetrust_command,
    environment,
    free_port,
    run_checked,
    run_command,
    say,
    show_command,
    spawn,
    wait_for_log,
)

RUNTIME_POLICY = "car-runtime"
# The name the server looks the image-signature policy up by (setting image_signature_policy).
IMAGE_SIGNATURE_POLICY = "image-signature"
SIGNING_KEY_NAME = "demo-release"
IMAGE_PATH = "donkeycar/car"
IMAGE_TAG = "5.3.0-demo"
NAMESPACE = "donkeycar"
# Files of the car that the IMA simulator measures. data/ is left out because the car writes its
# drive log there while it drives, and the runtime policy leaves it out too.
CAR_MEASURED = ("manage.py", "config.py", "myconfig.py", "models")
# Seconds between two passes of the IMA simulator, so a changed file is measured quickly.
IMA_REMEASURE_SECONDS = 1.0
AGENT_START_TIMEOUT_SECONDS = 180.0
VERDICT_TIMEOUT_SECONDS = 120.0
GUARD_TIMEOUT_SECONDS = 60.0
GUARD_GRACE_SECONDS = 5.0
# Loops of the car's drive loop (20 Hz in the template) between two status lines.
CAR_REPORT_EVERY = 20


# --- the car and its image -----------------------------------------------------------------------


def create_car(context: DemoContext) -> None:
    words = ["car", "init", str(context.car_dir)]
    show_command(context, ["edgetrust", *words])
    result = run_checked(words, environment({}))
    for line in result.stdout.splitlines():
        say(context, line)


def start_registry(context: DemoContext) -> None:
    context.registry = LocalRegistry(context.workdir / "registry")
    registry = context.registry.start()
    say(context, f"docker-registry serving {registry.url} (data in {registry.directory / 'data'})")

    files = {f"opt/car/{path.relative_to(context.car_dir)}": path.read_bytes()
             for path in sorted(context.car_dir.rglob("*")) if path.is_file()}
    context.image = registry.push_image(IMAGE_PATH, IMAGE_TAG, files)
    say(context, f"pushed {context.image.repository}:{IMAGE_TAG}, a layer with the car's "
                 f"{len(files)} files under /opt/car")
    say(context, f"  = {context.image.pinned}")

    key = generate_signing_key()
    context.signing_public_key = public_key_pem(key)
    public_key_file = context.workdir / "cosign.pub"
    public_key_file.write_text(context.signing_public_key)
    signature_tag = registry.sign_image(context.image, key)
    say(context, f"signed it with a new ECDSA P-256 key (public key {public_key_file.name}) in "
                 f"cosign's format: tag {signature_tag}")


# --- the device agent ------------------------------------------------------------------------------


def agent_environment(context: DemoContext, state_dir: Path, **extra: str) -> dict[str, str]:
    """Return the settings of `edgetrust agent` for the demo device, plus ``extra`` settings
    given by their lower-case names."""
    assert context.swtpm is not None
    values = {
        "EDGETRUST_DATA_DIR": str(context.workdir / "device-data"),
        "EDGETRUST_AGENT_UUID": context.device_id,
        "EDGETRUST_AGENT_TCTI": context.swtpm.tcti,
        "EDGETRUST_AGENT_STATE_DIR": str(state_dir),
        "EDGETRUST_AGENT_REGISTRAR_URL": context.server_url,
        "EDGETRUST_AGENT_EK_TYPE": "rsa",
        "EDGETRUST_AGENT_AK_TYPE": "ecc",
    }
    values.update({f"EDGETRUST_{name.upper()}": value for name, value in extra.items()})
    return environment(values)


def donkeycar_directory() -> Path:
    """Return the directory of the installed donkeycar package, without importing it."""
    spec = importlib.util.find_spec("donkeycar")
    if spec is None or not spec.submodule_search_locations:
        raise DemoFailed("the donkeycar package is not installed. Install the demo extra: "
                         "pip install -e '.[device,demo]'")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def start_agent(context: DemoContext) -> None:
    context.agent_port = free_port()
    package = donkeycar_directory()
    measured = [str(context.car_dir / name) for name in CAR_MEASURED] + [str(package)]
    # NOTE: on a host with a TPM event log in securityfs, the agent serves that log beside
    # the swtpm quotes, which do not match it. agent_ima_kernel_list moves the kernel's IMA
    # list out of the way below, but no setting turns off the securityfs event log.
    env = agent_environment(
        context, context.workdir / "agent-state",
        agent_contact_port=str(context.agent_port),
        agent_client_ca=str(context.tls_dir / "ca.pem"),
        agent_ima_kernel_list=str(context.workdir / "no-kernel-ima-list"),
        agent_ima_measure_paths=",".join(measured),
        agent_ima_remeasure_interval=str(IMA_REMEASURE_SECONDS),
    )
    agent = spawn(context, "agent", ["agent"], env)

    simulator = wait_for_log(context, "agent", r"IMA simulator measuring .* \((\d+) entries\)",
                             AGENT_START_TIMEOUT_SECONDS, agent)
    wait_for_log(context, "agent", "waiting for SIGTERM or SIGINT", AGENT_START_TIMEOUT_SECONDS, agent)
    car_files = sum(len(_files(context.car_dir / name)) for name in CAR_MEASURED)
    say(context, f"agent registered again and serves the Keylime agent API on "
                 f"https://127.0.0.1:{context.agent_port}, only to clients with a certificate from "
                 f"{context.tls_dir.name}/ca.pem")
    say(context, f"IMA simulator: {simulator.group(1)} entries extended into PCR 10: "
                 f"boot_aggregate, {car_files} files of the car ({', '.join(CAR_MEASURED)}) and "
                 f"{len(_files(package))} files of {package}")
    say(context, f"it measures them again every {IMA_REMEASURE_SECONDS:g} s, so a changed file "
                 "adds an entry")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [child for child in path.rglob("*") if child.is_file()]


# --- policies and the verifier ---------------------------------------------------------------------


def upload_policies(context: DemoContext) -> None:
    assert context.registry is not None
    admin = environment({"EDGETRUST_TOKEN": context.api_token})
    policy_file = context.workdir / "runtime-policy.json"

    create = ["policy", "create", "runtime", "--donkeycar-car", str(context.car_dir),
              "-o", str(policy_file)]
    show_command(context, ["edgetrust", *create])
    run_checked(create, admin)
    digests: dict[str, Any] = json.loads(policy_file.read_text())["digests"]
    car_paths = sorted(path for path in digests if path.startswith(f"{context.car_dir}/"))
    names = ", ".join(Path(path).relative_to(context.car_dir).as_posix() for path in car_paths)
    say(context, f"{policy_file.name} allows {len(digests)} files: {len(car_paths)} of the car "
                 f"({names}) and {len(digests) - len(car_paths)} of the donkeycar distribution")
    if str(context.model_path) not in car_paths:
        raise DemoFailed(f"the runtime policy does not list the model file {context.model_path}")

    _upload(context, admin, RUNTIME_POLICY, policy_file, "runtime")

    signature_policy = {
        "keys": {SIGNING_KEY_NAME: context.signing_public_key},
        "rules": [{"repository": f"{context.registry.host}/donkeycar/*", "keys": [SIGNING_KEY_NAME]}],
    }
    signature_file = context.workdir / "image-signature-policy.json"
    signature_file.write_text(json.dumps(signature_policy, indent=2) + "\n")
    say(context, f"{signature_file.name}: key {SIGNING_KEY_NAME!r} (cosign.pub) may sign "
                 f"{context.registry.host}/donkeycar/*")
    _upload(context, admin, IMAGE_SIGNATURE_POLICY, signature_file, "image-signature")


def _upload(context: DemoContext, env: dict[str, str], name: str, path: Path, kind: str) -> None:
    upload = ["policy", "store", "upload", name, str(path), "--kind", kind,
              "--server", context.server_url]
    show_command(context, ["edgetrust", *upload])
    say(context, "  (with the admin token in $EDGETRUST_TOKEN)")
    say(context, run_checked(upload, env).stdout.strip())


def add_to_verifier(context: DemoContext) -> None:
    body = {"cloudagent_ip": "127.0.0.1", "cloudagent_port": context.agent_port,
            "runtime_policy": RUNTIME_POLICY, "poll_interval": POLL_INTERVAL_SECONDS}
    say(context, f"POST /v1/devices/{context.device_id} {json.dumps(body)}")
    api_call(context, "POST", f"/v1/devices/{context.device_id}", body=body, expected=201)

    node_mapping = {"device_id": context.device_id, "labels": {"edgetrust.io/fleet": "demo"}}
    say(context, f"PUT /v1/nodes/{context.node_name} {json.dumps(node_mapping)}")
    api_call(context, "PUT", f"/v1/nodes/{context.node_name}", body=node_mapping)
    say(context, f"mapped the Kubernetes node {context.node_name} to {context.device_id}")

    started = time.monotonic()
    verdict = wait_for_verdict(context, "trusted")
    device = api_get(context, f"/v1/devices/{context.device_id}")
    say(context, f"verdict trusted after {time.monotonic() - started:.0f} s (verdict_id "
                 f"{verdict['verdict_id']}, expires_at {verdict['expires_at']})")
    say(context, f"the quote verified with the enrolled AK, {device['state']['ima_next_entry']} IMA "
                 f"entries replayed to the quoted PCR 10, and each file's digest is in "
                 f"{RUNTIME_POLICY}")


def wait_for_verdict(context: DemoContext, expected: str) -> dict[str, Any]:
    """Read the device's verdict until its status is ``expected``, and return it. Raise
    DemoFailed on timeout, or at once when waiting for trusted and the verdict is untrusted."""
    deadline = time.monotonic() + VERDICT_TIMEOUT_SECONDS
    while True:
        verdict = api_get(context, f"/v1/devices/{context.device_id}/verdict", token=context.read_token)
        if verdict["status"] == expected:
            return verdict
        if expected == "trusted" and verdict["status"] == "untrusted":
            raise DemoFailed(f"the verdict is untrusted, expected trusted: {_reasons(verdict)}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"the verdict is still {verdict['status']} ({_reasons(verdict)}) after "
                             f"{VERDICT_TIMEOUT_SECONDS:.0f} s, expected {expected}")
        time.sleep(0.5)


def _reasons(verdict: dict[str, Any]) -> str:
    reasons = [f"{reason['code']}: {reason['message']}" for reason in verdict["reasons"]]
    return "; ".join(reasons) or "no reasons"


# --- the car under the guard ---------------------------------------------------------------------


def start_car(context: DemoContext) -> None:
    car = ["car", "--car-dir", str(context.car_dir), "--report-every", str(CAR_REPORT_EVERY)]
    guard = ["guard", "--device", context.device_id, "--server", context.server_url,
             "--token-file", str(context.read_token_file), "--grace-period", f"{GUARD_GRACE_SECONDS:g}"]
    show_command(context, ["edgetrust", *guard, "--", "edgetrust", *car])
    context.guard = spawn(context, "guard", [*guard, "--", *edgetrust_command(car)], environment({}))

    started = wait_for_log(context, "guard", r"started CMD \(pid (\d+), run 1\)[^\n]*",
                           GUARD_TIMEOUT_SECONDS, context.guard)
    context.car_pids.add(int(started.group(1)))
    say(context, f"guard: {started.group(0)}")
    loop = wait_for_log(context, "guard", r"loop \d+: steering \S+ throttle \S+", GUARD_TIMEOUT_SECONDS,
                        context.guard)
    say(context, f"car:   {loop.group(0)}")


def check_allowed(context: DemoContext) -> None:
    attestations = _attestations(context)
    say(context, f"the verifier has attested {context.device_id} {len(attestations)} times since it "
                 "was added; the verdict is trusted")

    status, output = _gate(context)
    if status != 0:
        raise DemoFailed(f"edgetrust gate exited with status {status}, expected 0 (allowed): {output}")

    response = _admission(context)
    if response["allowed"] is not True:
        raise DemoFailed(f"the admission webhook denied the pod: {response['status']['message']}")
    say(context, f"  allowed (decision {response['auditAnnotations']['decision-id']}, device "
                 f"{response['auditAnnotations'].get('device-id')})")


# --- a changed model file ------------------------------------------------------------------------


def change_model(context: DemoContext) -> None:
    model = json.loads(context.model_path.read_text())
    model["steering"]["bias"] = 0.5
    context.model_path.write_text(json.dumps(model, indent=2) + "\n")
    say(context, f"set the pilot's steering bias to 0.5 in {context.model_path}")

    started = time.monotonic()
    verdict = wait_for_verdict(context, "untrusted")
    say(context, f"verdict untrusted {time.monotonic() - started:.0f} s later (verdict_id "
                 f"{verdict['verdict_id']})")

    findings = [finding for attestation in _attestations(context, limit=5)
                for finding in attestation["findings"] or []]
    named = [finding for finding in findings
             if finding.get("context", {}).get("path") == str(context.model_path)]
    if not named:
        codes = sorted({finding["code"] for finding in findings})
        raise DemoFailed(f"no finding names {context.model_path}. The latest findings have the codes "
                         f"{codes}")
    finding = named[0]
    say(context, f"finding {finding['code']} ({finding['severity']}): {finding['message']}")


def check_denied(context: DemoContext) -> None:
    assert context.guard is not None
    stopping = wait_for_log(context, "guard", r"stopping CMD \(pid \d+\): verdict untrusted[^\n]*",
                            GUARD_TIMEOUT_SECONDS, context.guard)
    say(context, f"guard: {stopping.group(0)}")
    stopped = wait_for_log(context, "guard", r"car stopped after \d+ loops \(SIGTERM\)[^\n]*",
                           GUARD_TIMEOUT_SECONDS, context.guard, after=stopping.start())
    say(context, f"car:   {stopped.group(0)}")
    exited = wait_for_log(context, "guard", r"CMD \(pid \d+\) stopped with status \d+",
                          GUARD_TIMEOUT_SECONDS, context.guard, after=stopping.start())
    say(context, f"guard: {exited.group(0)}; it stays stopped until the guard is restarted")

    status, output = _gate(context)
    if status != 1:
        raise DemoFailed(f"edgetrust gate exited with status {status}, expected 1 (denied): {output}")

    response = _admission(context)
    if response["allowed"] is not False:
        raise DemoFailed("the admission webhook allowed the pod on the untrusted node")
    message = response["status"]["message"]
    if "device-not-trusted" not in message:
        raise DemoFailed(f"the admission webhook denied the pod, but not with device-not-trusted: {message}")
    say(context, f"  denied: {message}")


# --- the rollout gate and the admission webhook --------------------------------------------------


def _gate(context: DemoContext) -> tuple[int, str]:
    """Run `edgetrust gate` for the signed image on the device, print its output, and return
    its exit status and output."""
    assert context.image is not None
    words = ["gate", "--server", context.server_url, "--image", context.image.pinned,
             "--device", context.device_id]
    show_command(context, ["edgetrust", *words])
    say(context, "  (with the read token in $EDGETRUST_TOKEN)")
    result = run_command(words, environment({"EDGETRUST_TOKEN": context.read_token}))
    output = (result.stdout + result.stderr).strip()
    for line in output.splitlines():
        say(context, f"  {line}")
    say(context, f"  exit status {result.returncode}")
    return result.returncode, output


def _admission(context: DemoContext) -> dict[str, Any]:
    """Send an AdmissionReview for a car pod on the device's node and return its response."""
    assert context.image is not None
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "car-0", "namespace": NAMESPACE, "labels": {"app": "donkeycar"}},
        "spec": {"nodeName": context.node_name,
                 "containers": [{"name": "car", "image": context.image.pinned}]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": NAMESPACE, "name": "car-0", "object": pod,
        },
    }
    say(context, f"POST /v1/admission: AdmissionReview of pod {NAMESPACE}/car-0 on node "
                 f"{context.node_name} with image {IMAGE_PATH}@{context.image.digest[:19]}...")
    result = api_call(context, "POST", "/v1/admission", body=review, token=context.read_token)
    response: dict[str, Any] = result["response"]
    return response


def _attestations(context: DemoContext, limit: int = 1000) -> list[dict[str, Any]]:
    result = api_get(context, f"/v1/devices/{context.device_id}/attestations?limit={limit}")
    attestations: list[dict[str, Any]] = result["attestations"]
    return attestations

