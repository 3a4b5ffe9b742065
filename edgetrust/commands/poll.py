"""``edgetrust poll``: attest devices continuously, and the poller that ``serve`` runs itself.

Any number of ``edgetrust poll`` processes can share a PostgreSQL database: each claims the
devices that are due with a lease. With the embedded SQLite database, ``edgetrust serve``
runs one poller inside its worker process instead (setting ``verifier_poll_in_server``).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edgetrust.commands.common import config_option, settings_from
from edgetrust.commands.server import prepare_database
from edgetrust.db import make_engine, make_session_factory
from edgetrust.settings import Settings, SettingsError

log = logging.getLogger(__name__)


@click.command("poll")
@config_option
@click.option("--threads", type=int,
              help="Attestations run at the same time (setting verifier_poller_threads).")
def poll_command(config_file: Path | None, threads: int | None) -> None:
    """Attest the verifier's devices until stopped with SIGTERM or Ctrl-C."""
    settings = settings_from(config_file, verifier_poller_threads=threads)
    engine = make_engine(settings.effective_database_url, **_pool_size(settings))
    prepare_database(engine)

    from verifier.poller import build_poller

    try:
        poller = build_poller(settings, make_session_factory(engine))
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc

    from verifier.notify import start_delivery_worker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    delivery_stop = start_delivery_worker(settings)
    try:
        poller.run(stop)
    finally:
        delivery_stop.set()
    engine.dispose()


@dataclass(frozen=True)
class EmbeddedPoller:
    """A poller thread inside a server worker process."""

    stop_event: threading.Event
    thread: threading.Thread

    def stop(self) -> None:
        """Stop claiming devices, then wait for the attestations already claimed to be stored.

        A worker that exited without this would leave the devices it claimed during its
        shutdown leased until ``verifier_lease_seconds`` passed, and unattested until then.
        """
        self.stop_event.set()
        self.thread.join()


def start_embedded_poller(settings: Settings) -> EmbeddedPoller | None:
    """Start a poller thread in this process when the settings ask for one, and return it.

    Runs only with SQLite and ``verifier_poll_in_server``. A poller that cannot be built from
    the settings (mTLS on without a client certificate) is logged and not started, so that the
    server still serves the registrar and the APIs.
    """
    engine = make_engine(settings.effective_database_url, **_pool_size(settings))
    if not settings.verifier_poll_in_server or engine.url.get_backend_name() != "sqlite":
        engine.dispose()
        return None

    from verifier.poller import build_poller

    try:
        poller = build_poller(settings, make_session_factory(engine))
    except SettingsError as exc:
        log.warning("the poller is not running, so no device is attested: %s", exc)
        engine.dispose()
        return None

    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,), name="embedded-poller", daemon=True)
    thread.start()
    return EmbeddedPoller(stop, thread)


def _pool_size(settings: Settings) -> dict[str, Any]:
    # One connection per attestation thread, plus the claim loop and a spare. No ping before
    # each checkout: it costs a round trip per transaction, and after a database restart the
    # first failed transaction makes SQLAlchemy replace every pooled connection anyway.
    return {"pool_size": settings.verifier_poller_threads + 2, "pool_pre_ping": False}
