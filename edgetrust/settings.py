"""Settings: defaults, then a TOML file, then ``EDGETRUST_*`` environment variables.

Every setting is a field of :class:`Settings` with its default and a help text; docs/configuration.md
lists them all (a test keeps the two in line). Keys are flat: the TOML key ``agent_tcti`` is the
environment variable ``EDGETRUST_AGENT_TCTI``. Lists are TOML arrays or comma-separated in the
environment; booleans are ``true``/``false``, ``1``/``0``, ``yes``/``no`` in the environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ENV_PREFIX = "EDGETRUST_"
CONFIG_ENV = "EDGETRUST_CONFIG"


class SettingsError(Exception):
    """A configuration value that cannot be used; the message names the key and the fix."""

    code = "invalid-settings"


def _default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgetrust"


def _setting(default: Any, help: str) -> Any:  # noqa: A002 - the dataclass metadata key is "help"
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    # Storage
    data_dir: Path = field(
        default_factory=_default_data_dir,
        metadata={"help": "Directory for the embedded database and generated files "
                  "(default: $XDG_DATA_HOME/edgetrust or ~/.local/share/edgetrust)."},
    )
    database_url: str = _setting(
        "", "SQLAlchemy database URL; empty means the SQLite file <data_dir>/edgetrust.db. "
        "PostgreSQL: postgresql+psycopg://user@host:port/dbname.")

    # Server
    listen_host: str = _setting("127.0.0.1", "Address the server binds to.")
    listen_port: int = _setting(8890, "TCP port of the server (registrar, verifier and trust APIs).")
    server_workers: int = _setting(1, "gunicorn worker processes; keep 1 with SQLite.")
    server_threads: int = _setting(8, "Threads per gunicorn worker.")
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")

    # API authentication and the trust API
    api_auth: bool = _setting(
        True, "Require an API token (Authorization: Bearer) on every route except the Keylime "
        "agent-facing routes and /healthz. false leaves the whole API open, which the server "
        "logs at WARNING on start.")
    admission_client_cns: list[str] = _setting(
        [], "Common names of client certificates that may call POST /v1/admission without a "
        "token, as the WSGI server reports them in SSL_CLIENT_S_DN_CN after verifying the "
        "certificate. Empty means the admission route needs a read token like the others.")
    jws_signing_key: Path | None = _setting(
        None, "PEM file of the ECDSA P-256 private key that signs verdicts (JWS ES256). Unset "
        "means <data_dir>/jws-signing-key.pem, generated on first start. Give every server "
        "replica the same key.")
    jws_issuer: str = _setting("edgetrust", "The iss claim of signed verdicts.")
    trust_batch_max_items: int = _setting(
        1000, "Most device ids or node names one POST /v1/verdicts:batch request may name.")
    trust_stream_poll_interval: float = _setting(
        1.0, "Seconds between two reads of the verdict history by each open verdict stream.")
    trust_stream_heartbeat: float = _setting(
        15.0, "Seconds without an event after which a verdict stream sends a heartbeat comment.")
    trust_stream_max_seconds: float = _setting(
        300.0, "Seconds after which the server ends a verdict stream; clients reconnect with "
        "Last-Event-ID and miss nothing.")

    # Policy store (/v1/policies)
    policy_signing_keys: list[str] = _setting(
        [], "Files of the PEM public keys (ECDSA, such as P-256) that may sign policies "
        "uploaded to /v1/policies. A signed upload must verify with one of them. Empty: a "
        "signed upload is verified with the public_key sent in the same request, which shows "
        "only that the policy is intact, and the server logs a warning on start.")
    policy_require_signature: bool = _setting(
        False, "Reject policy uploads that are not DSSE envelopes signed with a key of "
        "policy_signing_keys, which must then list at least one key. false also stores "
        "unsigned policies uploaded with an admin token.")

    # Node controller (edgetrust nodes controller)
    nodes_kube_api_url: str = _setting(
        "", "URL of the Kubernetes API server; empty means the in-cluster service account "
        "configuration.")
    nodes_kube_token_file: Path | None = _setting(
        None, "File holding the bearer token for nodes_kube_api_url.")
    nodes_kube_ca_file: Path | None = _setting(
        None, "PEM CA bundle that signs the certificate of nodes_kube_api_url.")
    nodes_trust_api_url: str = _setting(
        "http://127.0.0.1:8890", "Base URL of the trust API that the node controller reads "
        "verdicts from.")
    nodes_trust_token_file: Path | None = _setting(
        None, "File holding a read API token for nodes_trust_api_url.")
    nodes_interval: float = _setting(
        10.0, "Seconds between two passes of the node controller over all nodes.")
    nodes_backoff_max: float = _setting(
        60.0, "Longest delay, in seconds, before the node controller retries after the "
        "Kubernetes API server or the trust API failed; the delay starts at 1 s and doubles.")

    # Registrar
    ek_ca_dir: Path | None = _setting(
        None, "Directory of PEM files (roots and intermediates) that EK certificates must chain "
        "to (default: <data_dir>/ek-ca).")
    require_ek_certificate: bool = _setting(
        True, "Reject registrations that carry no EK certificate. Set false only for TPMs "
        "without one, such as some firmware TPMs.")
    ak_allowed_algorithms: list[str] = _setting(
        ["rsassa-sha256", "rsapss-sha256", "ecdsa-sha256", "rsassa-sha384", "rsapss-sha384",
         "ecdsa-sha384", "rsassa-sha512", "rsapss-sha512", "ecdsa-sha512"],
        "Signing schemes an AK may use, as <scheme>-<hash>.")

    # Device agent
    agent_uuid: str = _setting("", "The device's agent uuid; empty means one is generated on "
                               "first start and kept in <agent_state_dir>.")
    agent_tcti: str = _setting("device:/dev/tpmrm0", "TPM connection (TCTI), for example "
                               "swtpm:host=127.0.0.1,port=2321.")
    agent_state_dir: Path | None = _setting(
        None, "Directory where the agent keeps its uuid and AK (default: <data_dir>/agent).")
    agent_registrar_url: str = _setting("http://127.0.0.1:8890", "Base URL of the registrar.")
    agent_ek_type: str = _setting(
        "rsa", "EK algorithm: rsa (RSA-2048) or ecc (the certified NIST P-256 EK, else the "
        "certified P-384 EK that swtpm_setup makes, else P-256 from the TCG template).")
    agent_ak_type: str = _setting("ecc", "AK key type: rsa (RSASSA-SHA256) or ecc (ECDSA-SHA256 "
                                  "on NIST P-256).")
    agent_contact_host: str = _setting("127.0.0.1", "Address the agent reports to the registrar "
                                       "and serves its API on.")
    agent_contact_port: int = _setting(9002, "TCP port the agent reports and serves its API on.")
    agent_retry_initial: float = _setting(1.0, "First delay, in seconds, before retrying an "
                                          "unreachable registrar; doubles up to agent_retry_max.")
    agent_retry_max: float = _setting(60.0, "Longest delay, in seconds, between retries.")
    agent_enable_mtls: bool = _setting(
        True, "Serve the agent API over HTTPS with the agent's self-signed certificate and "
        "require a client certificate signed by agent_client_ca. false serves plain HTTP, which "
        "the agent logs at WARNING on start.")
    agent_client_ca: Path | None = _setting(
        None, "PEM file of the CA certificates that sign verifier client certificates; "
        "required when agent_enable_mtls is true.")
    agent_ima_kernel_list: Path | None = _setting(
        None, "The kernel's ASCII IMA measurement list (default: "
        "/sys/kernel/security/ima/ascii_runtime_measurements). When it exists the agent serves "
        "it and the IMA simulator stays off.")
    agent_ima_measure_paths: list[str] = _setting(
        [], "Files and directory trees that the IMA simulator measures into PCR 10 and "
        "<agent_state_dir>/ima/ascii_runtime_measurements when the kernel has no IMA "
        "measurement list, such as the DonkeyCar car directory and the installed donkeycar "
        "package. Empty turns the simulator off.")
    agent_ima_remeasure_interval: float = _setting(
        60.0, "Seconds between two passes of the IMA simulator over agent_ima_measure_paths; a "
        "file whose content changed gets a new entry. 0 measures only on start.")
    agent_event_log: Path | None = _setting(
        None, "Binary UEFI event log to send as mb_measurement_list when "
        "/sys/kernel/security/tpm0/binary_bios_measurements does not exist.")
    agent_event_log_replay: bool = _setting(
        False, "Extend PCRs 0-9 and 14 with the digests of agent_event_log once after each TPM "
        "reset, in place of firmware, on a TPM simulator. Never set it with a hardware TPM.")
    agent_push: bool = _setting(
        False, "Push evidence to the verifier (push mode, for devices behind NAT) instead of "
        "serving the agent API: ask for a challenge, quote, post the evidence, and wait until "
        "the verifier asks for the next one. The device must be in push mode on the verifier.")
    agent_push_url: str = _setting(
        "", "Base URL of the verifier that push mode posts evidence to; empty means "
        "agent_registrar_url.")

    # Verifier
    verifier_poll_interval: float = _setting(
        10.0, "Seconds between two attestations of a device added without poll_interval.")
    verifier_verdict_lifetime_intervals: int = _setting(
        3, "A trusted verdict turns unknown after this many poll intervals without a newer "
        "passing attestation.")
    verifier_accepted_banks: list[str] = _setting(
        ["sha512", "sha384", "sha256"], "PCR banks a quote may use (Keylime's "
        "accept_tpm_hash_algs); add sha1 only for TPMs without a SHA-256 bank.")
    verifier_allow_ima_violations: bool = _setting(
        False, "Let IMA violations (a file measured while open for writing) pass as warnings "
        "instead of failing the device.")
    verifier_allow_zero_boot_aggregate: bool = _setting(
        False, "Accept an all-zeros boot_aggregate, which a kernel logs when it found no TPM.")
    verifier_agent_mtls: bool = _setting(
        True, "Reach agents over mutual TLS, checking each agent's certificate against the "
        "mtls_cert it registered. false means plain HTTP, which the poller logs at start.")
    verifier_tls_cert: Path | None = _setting(
        None, "PEM certificate the verifier presents to agents over mutual TLS.")
    verifier_tls_key: Path | None = _setting(
        None, "PEM private key of verifier_tls_cert.")
    verifier_agent_api_version: str = _setting(
        "2.1", "Keylime agent API version of the quote requests (/v<version>/quotes/integrity).")
    verifier_agent_timeout: float = _setting(
        10.0, "Seconds to wait for an agent to connect and to answer a quote request.")
    verifier_poller_threads: int = _setting(
        8, "Attestations one poller runs at the same time.")
    verifier_claim_batch: int = _setting(
        32, "Devices a poller claims in one database transaction.")
    verifier_lease_seconds: float = _setting(
        60.0, "Seconds a poller holds a claimed device; a dead poller's devices are due again "
        "after this. At least four times verifier_agent_timeout plus 10.")
    verifier_backoff_max: float = _setting(
        300.0, "Longest delay, in seconds, before retrying an unreachable agent; the delay "
        "starts at the poll interval and doubles with each failure.")
    verifier_poller_id: str = _setting(
        "", "Name of this poller in leases and attestation records (default: <host>-<pid>).")
    verifier_poll_in_server: bool = _setting(
        True, "Run the poller inside `edgetrust serve` when the database is SQLite. With "
        "PostgreSQL, run `edgetrust poll` workers instead.")

    # Push mode
    verifier_push_challenge_seconds: float = _setting(
        60.0, "Seconds a push-mode challenge stays valid; evidence for it that arrives later is "
        "rejected and the device asks for a new challenge.")
    verifier_push_grace_seconds: float = _setting(
        30.0, "Seconds a push-mode device may be late: a trusted verdict turns unknown when no "
        "new evidence arrived by the last attestation plus the device's poll_interval plus "
        "this grace.")

    # Webhooks for verdict changes (receivers are managed with /v1/webhooks)
    webhook_timeout: float = _setting(
        10.0, "Seconds a webhook receiver may take to accept the connection and, again, to "
        "answer one delivery.")
    webhook_max_attempts: int = _setting(
        8, "Attempts to deliver one event to one receiver before the delivery is marked failed.")
    webhook_backoff_initial: float = _setting(
        5.0, "Seconds before the first retry of a failed delivery; the delay doubles with each "
        "attempt up to webhook_backoff_max.")
    webhook_backoff_max: float = _setting(
        3600.0, "Longest delay, in seconds, between two attempts of one delivery.")
    webhook_poll_interval: float = _setting(
        1.0, "Seconds the delivery worker waits between two reads of the outbox when it is empty.")
    webhook_threads: int = _setting(
        4, "Deliveries one delivery worker sends at the same time.")

    # Retention (pruned by every poller, and by `edgetrust db prune`)
    attestation_retention: timedelta = _setting(
        timedelta(days=7), "How long attestation rows are kept, as a duration such as 7d, 36h or "
        "90m, or a number of seconds. Each device's latest attestation, the one that issued its "
        "current verdict and the one that last changed its verdict are kept however old they "
        "are. 0 keeps every row.")
    outbox_retention: timedelta = _setting(
        timedelta(days=3), "How long webhook deliveries that were delivered or failed are kept "
        "after their last attempt, as a duration like attestation_retention. Pending deliveries "
        "are never deleted. 0 keeps every row.")
    retention_interval: float = _setting(
        600.0, "Seconds between two prune passes of each poller. On PostgreSQL only one poller "
        "prunes at a time. 0 turns pruning in the pollers off, leaving it to `edgetrust db "
        "prune`.")
    retention_batch_size: int = _setting(
        5000, "Maximum number of rows that one prune transaction deletes, so that each "
        "transaction holds its row locks only briefly.")

    # Admission webhook and rollout gate
    admission_timeout: float = _setting(
        10.0, "timeoutSeconds of the ValidatingWebhookConfiguration, 1 to 30. The webhook "
        "decides within 70% of it and denies an image whose signature check has not finished.")
    gate_timeout: float = _setting(
        30.0, "Seconds a POST /v1/gate request may spend checking the image signature.")
    image_signature_policy: str = _setting(
        "image-signature", "Name of the image-signature policy in the policy store that lists "
        "the cosign keys allowed to sign each repository.")
    image_signature_cache_size: int = _setting(
        4096, "Successful image signature checks kept in memory per server process; 0 turns "
        "the cache off.")
    image_signature_cache_seconds: float = _setting(
        3600.0, "Seconds a successful image signature check is reused. A signature deleted "
        "from the registry still counts this long.")
    image_check_threads: int = _setting(
        16, "Image signature checks that run at the same time in one server process.")
    registry_plain_http: list[str] = _setting(
        [], "Registries, as host or host:port, reached over plain HTTP instead of HTTPS.")
    registry_ca_bundle: Path | None = _setting(
        None, "PEM file of the CA certificates that registries' TLS certificates must chain to "
        "(default: the CA bundle of the requests package).")
    registry_request_timeout: float = _setting(
        10.0, "Maximum seconds one registry request may take; the admission and gate "
        "deadlines may end it sooner.")

    # Guard (edgetrust guard)
    guard_server_url: str = _setting(
        "http://127.0.0.1:8890", "Base URL of the trust API that the guard reads the device's "
        "verdict and verdict stream from.")
    guard_token_file: Path | None = _setting(
        None, "File holding the API token (scope read) that the guard sends; --token and "
        "--token-file override it. Unset sends no token.")
    guard_ca_file: Path | None = _setting(
        None, "PEM CA bundle that signs the certificate of an https guard_server_url (default: "
        "the CA bundle of the requests package).")
    guard_grace_period: float = _setting(
        5.0, "Seconds the guard waits after SIGTERM to the workload's process group before it "
        "sends SIGKILL.")
    guard_restart: bool = _setting(
        False, "Start the workload again when the device is trusted again after the guard "
        "stopped it, and after it exited on its own. false keeps a stopped workload stopped "
        "until the guard is restarted, and makes the guard exit with the workload's status.")
    guard_restart_delay: float = _setting(
        5.0, "Seconds after the workload exited on its own before guard_restart starts it again.")
    guard_reread_interval: float = _setting(
        10.0, "Longest time, in seconds, between two reads of the current verdict by the guard; "
        "it also reads it after every stream reconnect and before a trusted verdict expires.")
    guard_request_timeout: float = _setting(
        10.0, "Seconds the guard waits to connect to the trust API and for a verdict response.")
    guard_stream_idle_timeout: float = _setting(
        45.0, "Seconds without data or heartbeat on the verdict stream after which the guard "
        "reconnects; keep it above trust_stream_heartbeat.")
    guard_retry_initial: float = _setting(
        1.0, "First delay, in seconds, before the guard retries a failed stream connection or "
        "verdict read; the delay doubles up to guard_retry_max.")
    guard_retry_max: float = _setting(
        30.0, "Longest delay, in seconds, between two retries of the guard.")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'edgetrust.db'}"

    @property
    def effective_ek_ca_dir(self) -> Path:
        return self.ek_ca_dir or self.data_dir / "ek-ca"

    @property
    def effective_agent_state_dir(self) -> Path:
        return self.agent_state_dir or self.data_dir / "agent"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def setting_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def load_settings(
    config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from the defaults, ``config_file`` (or $EDGETRUST_CONFIG) and ``environ``."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    path = config_file or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    if path is not None:
        values.update(_read_toml(path))

    for f in setting_fields():
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _from_env(f, raw)

    converted = {name: _convert(name, value) for name, value in values.items()}
    converted.setdefault("data_dir", _default_data_dir(environ))
    return Settings(**converted)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"configuration file {path} is not valid TOML: {exc}") from exc

    known = {f.name for f in setting_fields()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(
            f"configuration file {path} has unknown key(s) {', '.join(unknown)}; "
            "see docs/configuration.md for the valid keys"
        )
    return data


def _field_type(name: str) -> Any:
    hints = typing.get_type_hints(Settings)
    hint = hints[name]
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _from_env(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _field_type(f.name)
    if typing.get_origin(kind) is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(
            f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a boolean; use true or false"
        )
    return raw


def _convert(name: str, value: Any) -> Any:
    kind = _field_type(name)
    env_name = ENV_PREFIX + name.upper()
    try:
        if kind is Path:
            return None if value in ("", None) else Path(value).expanduser()
        if kind is timedelta:
            return parse_duration(value)
        if kind is int and not isinstance(value, bool):
            return int(value)
        if kind is float:
            return float(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typing.get_origin(kind) is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting {name} ({env_name}) has invalid value {value!r}; expected {_type_name(kind)}"
        ) from None
    return value


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", Path: "a path",
            str: "a string", timedelta: _DURATION_FORMAT}.get(kind, str(kind))


_DURATION_FORMAT = "a duration such as 2w, 7d, 36h, 90m or 30s, or a number of seconds"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> timedelta:
    """Parse a non-negative duration: seconds as a number, or text like ``2w``, ``7d``, ``90m``.

    Raises ValueError or TypeError for anything else, including negative numbers.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a number or a string, got {type(value).__name__}")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip().lower())
        if match is None:
            raise ValueError(f"{value!r} is not a duration")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        seconds = float(value)
    if not 0 <= seconds < timedelta.max.total_seconds():
        raise ValueError(f"{value!r} is out of range")
    return timedelta(seconds=seconds)
