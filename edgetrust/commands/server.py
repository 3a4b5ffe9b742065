"""``edgetrust serve`` and ``edgetrust db``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from edgetrust.commands.common import config_option, settings_from
from edgetrust.db import (
    SchemaError,
    check_schema,
    current_revision,
    head_revision,
    is_new_sqlite_database,
    make_engine,
    upgrade,
)
from edgetrust.settings import Settings, SettingsError

if TYPE_CHECKING:
    from edgetrust.commands.poll import EmbeddedPoller

log = logging.getLogger(__name__)


@click.command("serve")
@config_option
@click.option("--host", help="Address to bind to (setting listen_host).")
@click.option("--port", type=int, help="TCP port (setting listen_port).")
def serve_command(config_file: Path | None, host: str | None, port: int | None) -> None:
    """Run the server: registrar, verifier and trust APIs."""
    settings = settings_from(config_file, listen_host=host, listen_port=port)
    engine = make_engine(settings.effective_database_url)
    prepare_database(engine)

    from edgetrust.app import create_app
    from evidence.errors import TrustStoreError

    try:
        app = create_app(settings, engine=engine)
    except TrustStoreError as exc:
        raise click.ClickException(f"{exc.message} (setting ek_ca_dir)") from exc
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    log.info("serving on http://%s:%d with database %s", settings.listen_host,
             settings.listen_port, engine.url.render_as_string(hide_password=True))
    # The poller of the worker process, filled in by post_fork in the worker after the fork.
    pollers: list[EmbeddedPoller] = []
    delivery_stops: list[threading.Event] = []
    run_gunicorn(app, settings.listen_host, settings.listen_port,
                 settings.server_workers, settings.server_threads,
                 post_fork=lambda _server, _worker: _start_poller(settings, pollers, delivery_stops),
                 worker_exit=lambda _server, _worker: _stop_pollers(pollers, delivery_stops))


def _start_poller(settings: Settings, pollers: list[EmbeddedPoller],
                  delivery_stops: list[threading.Event]) -> None:
    from edgetrust.commands.poll import start_embedded_poller
    from verifier.notify import start_delivery_worker

    poller = start_embedded_poller(settings)
    if poller is not None:
        pollers.append(poller)
    # Every worker delivers webhook notifications from the outbox, on either database.
    delivery_stops.append(start_delivery_worker(settings))


def _stop_pollers(pollers: list[EmbeddedPoller], delivery_stops: list[threading.Event]) -> None:
    # gunicorn kills a worker that takes longer than its graceful_timeout (30 s) to exit, so
    # this waits at most that long.
    for poller in pollers:
        poller.stop()
    for stop in delivery_stops:
        stop.set()


def prepare_database(engine: Engine) -> None:
    """Refuse to run on a database that is not at the newest revision. A SQLite database with
    no tables at all (the embedded default on first start) is created at the newest revision,
    because there is nothing in it to upgrade."""
    try:
        if is_new_sqlite_database(engine):
            log.info("creating the embedded database %s", engine.url.database)
            upgrade(engine)
        check_schema(engine)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from exc
    except SQLAlchemyError as exc:
        url = engine.url.render_as_string(hide_password=True)
        raise click.ClickException(f"cannot open the database {url}: {exc.__class__.__name__}: "
                                   f"{exc.args[0] if exc.args else exc}") from exc


def run_gunicorn(app: Any, host: str, port: int, workers: int, threads: int,
                 post_fork: Callable[[Any, Any], None] | None = None,
                 worker_exit: Callable[[Any, Any], None] | None = None) -> None:
    from gunicorn.app.base import BaseApplication

    class _Application(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("accesslog", None)
            self.cfg.set("timeout", 60)
            # gunicorn 27 opens a control socket under the user's home by default, which two
            # servers on one host would share; edgetrust does not use it.
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)
            if post_fork is not None:
                # Threads do not survive fork(), so each worker starts its own after forking.
                self.cfg.set("post_fork", post_fork)
            if worker_exit is not None:
                # Runs in the worker after it stopped serving requests, before it exits.
                self.cfg.set("worker_exit", worker_exit)

        def load(self) -> Any:
            return app

    _Application().run()


@click.group("db")
def db_group() -> None:
    """Manage the database schema."""


@db_group.command("upgrade")
@config_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade_command(config_file: Path | None, revision: str) -> None:
    """Apply schema migrations to the configured database."""
    settings = settings_from(config_file)
    engine = make_engine(settings.effective_database_url)
    before = current_revision(engine)
    upgrade(engine, revision)
    after = current_revision(engine)
    click.echo(f"database {engine.url.render_as_string(hide_password=True)}: "
               f"{before or 'empty'} -> {after}")


@db_group.command("status")
@config_option
def db_status_command(config_file: Path | None) -> None:
    """Show the database's schema revision and the newest one this release has."""
    settings = settings_from(config_file)
    engine = make_engine(settings.effective_database_url)
    click.echo(f"current: {current_revision(engine) or 'none'}\nnewest:  {head_revision()}")
