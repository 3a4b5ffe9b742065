"""``edgetrust agent``: the device agent.

The agent enrolls with the registrar, then serves the Keylime agent API (quotes, the IMA
measurement list, the UEFI event log) until SIGTERM or SIGINT. With ``agent_push`` it pushes
that evidence to the verifier instead (``device.push``). The device modules are imported
inside the command because they need tpm2-pytss and libtss2, which only devices install (the
``device`` extra). Every other command must load without them.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from edgetrust.commands.common import config_option, settings_from
from edgetrust.logs import device_logger
from edgetrust.settings import Settings

if TYPE_CHECKING:
    from device.agent_service import AgentServiceConfig
    from device.enroll import AgentConfig, Enrollment
    from device.tpm import DeviceTpm

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1


@click.command("agent")
@config_option
@click.option("--once", is_flag=True,
              help="Exit with status 0 after enrollment instead of running until SIGTERM or "
                   "SIGINT.")
@click.pass_context
def agent_command(ctx: click.Context, config_file: Path | None, once: bool) -> None:
    """Run the device agent: enroll with the registrar, then serve the agent API until SIGTERM
    or SIGINT."""
    settings = settings_from(config_file)
    stop = StopSignal()
    stop.install()

    ctx.exit(run_agent(settings, once=once, stop=stop))


class StopSignal(threading.Event):
    """An event that SIGTERM and SIGINT set, remembering which signal arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.signal_name: str | None = None

    def install(self) -> None:
        """Install the handlers; call from the main thread."""
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, self._handle)

    def _handle(self, signal_number: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signal_number).name
        self.set()


def agent_config(settings: Settings) -> AgentConfig:
    """Collect the agent settings that enrollment uses."""
    from device.enroll import AgentConfig
    from device.tls import load_or_create_tls_identity

    state_dir = settings.effective_agent_state_dir
    contact_host = settings.agent_contact_host

    def mtls_certificate(agent_id: str) -> str:
        return load_or_create_tls_identity(state_dir, agent_id, contact_host).certificate_pem

    return AgentConfig(
        configured_uuid=settings.agent_uuid,
        state_dir=settings.effective_agent_state_dir,
        registrar_url=settings.agent_registrar_url,
        ek_type=settings.agent_ek_type,
        ak_type=settings.agent_ak_type,
        contact_host=settings.agent_contact_host,
        contact_port=settings.agent_contact_port,
        retry_initial=settings.agent_retry_initial,
        retry_max=settings.agent_retry_max,
        mtls_certificate=mtls_certificate if settings.agent_enable_mtls else None,
    )


def service_config(settings: Settings) -> AgentServiceConfig:
    """Collect the agent settings that the evidence service and the agent API use."""
    from device.agent_service import AgentServiceConfig
    from device.ima_sim import KERNEL_IMA_LIST

    return AgentServiceConfig(
        state_dir=settings.effective_agent_state_dir,
        host=settings.agent_contact_host,
        port=settings.agent_contact_port,
        enable_mtls=settings.agent_enable_mtls,
        client_ca=settings.agent_client_ca,
        ima_kernel_list=settings.agent_ima_kernel_list or KERNEL_IMA_LIST,
        ima_measure_paths=tuple(Path(path).expanduser() for path in
                                settings.agent_ima_measure_paths),
        ima_remeasure_interval=settings.agent_ima_remeasure_interval,
        event_log=settings.agent_event_log,
        event_log_replay=settings.agent_event_log_replay,
        push_url=(settings.agent_push_url or settings.agent_registrar_url) if settings.agent_push else "",
        retry_initial=settings.agent_retry_initial,
        retry_max=settings.agent_retry_max,
    )


def run_agent(settings: Settings, *, once: bool, stop: threading.Event) -> int:
    """Enroll, then run until ``stop`` is set, or return right after enrollment if ``once``.

    Returns the exit status: 0 after a clean stop or a completed ``once`` run, 1 after an error
    or when ``once`` is stopped before enrollment finished.
    """
    try:
        from device.errors import DeviceError
        from device.tpm import DeviceTpm
    except ImportError as exc:
        log.error("the agent needs tpm2-pytss and libtss2 (pip install 'edgetrust[device]'): %s",
                  exc)
        return EXIT_FAILED

    log.info("agent starting: TPM %s, registrar %s, state directory %s", settings.agent_tcti,
             settings.agent_registrar_url, settings.effective_agent_state_dir)
    try:
        if not once:
            from device.agent_service import check_service_config

            check_service_config(service_config(settings))
        with DeviceTpm.connect(settings.agent_tcti) as tpm:
            from device.enroll import enroll_device

            enrollment = enroll_device(tpm, agent_config(settings), stop)
            if enrollment is None:
                log.info("agent stopped by %s before enrollment finished", _signal_name(stop))
                return EXIT_FAILED if once else EXIT_OK
            _log_enrolled(enrollment)
            if once:
                return EXIT_OK
            _run_until_stopped(tpm, enrollment, service_config(settings), stop)
    except DeviceError as exc:
        log.error("agent failed [%s]: %s", exc.code, exc.message,
                  extra={"device_id": exc.device_id or "-"})
        return EXIT_FAILED
    return EXIT_OK


def _log_enrolled(enrollment: Enrollment) -> None:
    device_logger(log, enrollment.agent_id).info(
        "registered and activated with the registrar at %s: uuid %s, AK name %s",
        enrollment.registrar_url, enrollment.agent_id, enrollment.ak_name.hex())


def _run_until_stopped(tpm: DeviceTpm, enrollment: Enrollment, config: AgentServiceConfig,
                       stop: threading.Event) -> None:
    """Serve the agent API, or push evidence, after enrollment until ``stop`` is set."""
    from device.agent_service import AgentService

    device_log = device_logger(log, enrollment.agent_id)
    service = AgentService(tpm, enrollment.agent_id, enrollment.ek, enrollment.identity.ak, config)
    service.start()
    try:
        device_log.info("enrolled and %s; waiting for SIGTERM or SIGINT",
                        "pushing evidence" if config.push_url else "serving the agent API")
        stop.wait()
        device_log.info("agent stopping on %s", _signal_name(stop))
    finally:
        service.stop()


def _signal_name(stop: threading.Event) -> str:
    return getattr(stop, "signal_name", None) or "request"
