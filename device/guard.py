"""The guard: run a workload only while the device's verdict is trusted and not expired.

The guard starts the workload command (CMD) in its own process group once the trust API
reports the device trusted, and stops it when the verdict turns untrusted or unknown, or when
``expires_at`` passes with no newer verdict. Expiry is a local timer on the monotonic clock,
so a silent stream or an unreachable server cannot keep the workload running
(``device.verdict_client`` explains how ``expires_at`` becomes a local deadline).

Stopping sends SIGTERM to CMD's process group, waits the grace period, then sends SIGKILL.
With ``restart`` the guard starts CMD again once the device is trusted again. Without it, a
CMD stopped for its verdict stays stopped until the guard itself is restarted.

The guard runs until SIGTERM or SIGINT (it then stops CMD and returns 0). When CMD exits on
its own, the guard returns CMD's exit status (128 + N for signal N) unless ``restart`` is set,
in which case it starts CMD again after ``restart_delay`` while the device is trusted.

All input reaches the main loop through one queue: verdicts from the follower threads, the
exit of CMD from its waiter thread, and stop requests from signal handlers. Only the main
loop starts and stops CMD.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from device.verdict_client import (
    Backoff,
    FollowerMessage,
    Observation,
    RereadFailed,
    VerdictStatus,
    VerdictUpdate,
)
from edgetrust.logs import device_logger

log = logging.getLogger(__name__)

# Shortest delay before reading the current verdict again while a trusted verdict is held.
MIN_REREAD_DELAY: Final = 0.5
# Maximum seconds the main loop sleeps without a message, so a missed wake-up costs at most this.
MAX_IDLE_SECONDS: Final = 5.0
# Exit statuses of a shell when a command cannot be run, which the guard mirrors.
EXIT_COMMAND_NOT_EXECUTABLE: Final = 126
EXIT_COMMAND_NOT_FOUND: Final = 127


@dataclass(frozen=True)
class GuardOptions:
    device_id: str
    command: tuple[str, ...]
    # Seconds between SIGTERM and SIGKILL when stopping CMD.
    grace_period: float = 5.0
    restart: bool = False
    # Seconds after CMD exited on its own before a restart.
    restart_delay: float = 5.0
    # Seconds between reads of the current verdict while the device is not trusted. While it is
    # trusted, the guard reads it at least this often and also before expires_at.
    reread_interval: float = 10.0
    reread_backoff: Backoff = Backoff()


# --- messages to the main loop ----------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadExited:
    run_number: int
    returncode: int


@dataclass(frozen=True)
class StopRequested:
    signal_name: str


Message = FollowerMessage | WorkloadExited | StopRequested


class Inbox:
    """The main loop's queue. ``put`` may be called from any thread and from signal handlers."""

    def __init__(self) -> None:
        # SimpleQueue.put is reentrant, so a signal handler may call it while the main thread
        # is inside get().
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def get(self, timeout: float) -> Message | None:
        try:
            return self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None


class VerdictSource(Protocol):
    """Interface of ``device.verdict_client.VerdictFollower`` that the guard uses."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def request_reread(self) -> None: ...


def install_stop_handlers(inbox: Inbox) -> None:
    """Turn SIGTERM and SIGINT into StopRequested messages; call from the main thread."""

    def handle(signal_number: int, _frame: object) -> None:
        inbox.put(StopRequested(signal.Signals(signal_number).name))

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, handle)


def exit_status(returncode: int) -> int:
    """Return a shell-style exit status: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


# --- the workload -----------------------------------------------------------------------------


class Workload:
    """One run of CMD, leader of its own process group, with a thread that waits for its exit."""

    def __init__(self, process: subprocess.Popen[bytes], run_number: int,
                 on_exit: Callable[[WorkloadExited], None],
                 logger: logging.LoggerAdapter[logging.Logger]) -> None:
        self.process = process
        self.run_number = run_number
        self._exited = threading.Event()
        self._on_exit = on_exit
        self._log = logger
        threading.Thread(target=self._wait, name=f"workload-{run_number}", daemon=True).start()

    @classmethod
    def start(cls, command: Sequence[str], run_number: int, on_exit: Callable[[WorkloadExited], None],
              logger: logging.LoggerAdapter[logging.Logger]) -> Workload:
        """Start ``command`` in a new session; raise OSError when it cannot be executed."""
        process = subprocess.Popen(list(command), start_new_session=True)
        return cls(process, run_number, on_exit, logger)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait(self) -> None:
        returncode = self.process.wait()
        self._exited.set()
        self._on_exit(WorkloadExited(self.run_number, returncode))

    def stop(self, grace_period: float) -> tuple[int, bool]:
        """Send SIGTERM to the process group, then SIGKILL after ``grace_period`` seconds.

        Return CMD's return code and whether SIGKILL was needed. Processes of the group that
        outlive CMD itself also get SIGKILL, so nothing of the workload keeps running.
        """
        self._signal_group(signal.SIGTERM)
        killed = False
        if not self._exited.wait(grace_period):
            self._signal_group(signal.SIGKILL)
            killed = True
            self._exited.wait()
        self._kill_leftovers()
        returncode = self.process.returncode
        assert returncode is not None
        return returncode, killed

    def _signal_group(self, signal_number: signal.Signals) -> bool:
        try:
            os.killpg(self.pid, signal_number)
        except ProcessLookupError:
            return False
        return True

    def _kill_leftovers(self) -> None:
        if self._signal_group(signal.SIGKILL):
            self._log.warning("killed processes left in the process group of CMD (pgid %d) after it "
                              "exited", self.pid)


# --- trust state ------------------------------------------------------------------------------


class TrustState:
    """The newest verdict the guard holds and the local deadline of a trusted one."""

    def __init__(self) -> None:
        self.held: Observation | None = None
        self.deadline: float | None = None
        self.expiry_logged = False

    def accept(self, observation: Observation) -> bool:
        """Hold ``observation`` unless the held verdict was issued after it; tell whether it was held."""
        if self.held is not None and observation.verdict.is_older_than(self.held.verdict):
            return False
        self.held = observation
        self.deadline = observation.trusted_until()
        self.expiry_logged = False
        return True

    def trusted_at(self, now: float) -> bool:
        return self.deadline is not None and now < self.deadline


# --- the guard --------------------------------------------------------------------------------


class Guard:
    """The guard's main loop; see the module documentation for its behaviour."""

    def __init__(self, options: GuardOptions, inbox: Inbox, source: VerdictSource, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._inbox = inbox
        self._source = source
        self._monotonic = monotonic
        self._log = device_logger(log, options.device_id)
        self._trust = TrustState()
        self._workload: Workload | None = None
        self._runs = 0
        self._stopped_for_verdict = False
        self._restart_not_before = 0.0
        self._next_reread = 0.0
        self._reread_failures = 0
        self._exit_code: int | None = None

    def run(self) -> int:
        """Run until SIGTERM or SIGINT, or until CMD exits on its own without restart.

        Return the guard's exit status.
        """
        self._log.info("guard started: command %s, grace period %.1f s, restart %s",
                       " ".join(self.options.command), self.options.grace_period,
                       "on" if self.options.restart else "off")
        self._source.start()
        try:
            while self._exit_code is None:
                self._enforce()
                if self._exit_code is not None:
                    break
                message = self._inbox.get(self._seconds_to_next_check())
                if message is not None:
                    self._handle(message)
        finally:
            self._source.stop()
        self._log.info("guard exiting with status %d", self._exit_code)
        return self._exit_code

    # Reacting to messages.

    def _handle(self, message: Message) -> None:
        if isinstance(message, VerdictUpdate):
            self._on_verdict(message.observation)
        elif isinstance(message, RereadFailed):
            self._on_reread_failed(message)
        elif isinstance(message, WorkloadExited):
            self._on_workload_exited(message)
        else:
            self._on_stop_requested(message)

    def _on_verdict(self, observation: Observation) -> None:
        now = self._monotonic()
        previous = self._trust.held
        if observation.source == "reread":
            self._reread_failures = 0
        if not self._trust.accept(observation):
            self._log.info("ignoring %s verdict %s from the %s: it was issued before the held verdict %s",
                           observation.verdict.status.value, observation.verdict.verdict_id,
                           observation.source, previous.verdict.verdict_id if previous else None)
            return
        self._log_change(previous, observation, now)
        self._schedule_reread(now)
        was_trusted = previous is not None and previous.verdict.status is VerdictStatus.TRUSTED
        held_back = self._stopped_for_verdict and not self.options.restart
        if held_back and self._trust.trusted_at(now) and not was_trusted:
            self._log.info("the device is trusted again, but CMD stays stopped because restart is off")

    def _log_change(self, previous: Observation | None, current: Observation, now: float) -> None:
        verdict = current.verdict
        same = (previous is not None and previous.verdict.status is verdict.status
                and previous.verdict.reasons == verdict.reasons)
        trusted = self._trust.trusted_at(now)
        level = logging.WARNING
        if same:
            level = logging.DEBUG
        elif trusted:
            level = logging.INFO
        expiry = f", expires_at {verdict.expires_at.isoformat()}" if verdict.expires_at else ""
        note = "" if trusted or verdict.status is not VerdictStatus.TRUSTED else " (already expired)"
        self._log.log(level, "verdict %s%s (reasons: %s; verdict_id %s%s) from the %s", verdict.status.value,
                      note, verdict.reason_codes, verdict.verdict_id, expiry, current.source)

    def _on_reread_failed(self, message: RereadFailed) -> None:
        self._reread_failures += 1
        now = self._monotonic()
        delay = self.options.reread_backoff.delay(self._reread_failures)
        level = logging.WARNING if self._reread_failures % 10 == 1 else logging.DEBUG
        self._log.log(level, "cannot read the current verdict (%d failures in a row), retrying in %.1f s: "
                      "%s", self._reread_failures, delay, message.error.message)
        self._next_reread = now + self._trusted_cap(delay, now)

    def _on_workload_exited(self, message: WorkloadExited) -> None:
        workload = self._workload
        if workload is None or workload.run_number != message.run_number:
            return  # a run that the guard stopped itself
        self._workload = None
        status = exit_status(message.returncode)
        if not self.options.restart:
            self._log.info("CMD (pid %d) exited on its own with status %d; the guard exits with it",
                           workload.pid, status)
            self._exit_code = status
            return
        self._restart_not_before = self._monotonic() + self.options.restart_delay
        self._log.warning("CMD (pid %d) exited on its own with status %d; starting it again in %.1f s "
                          "if the device is trusted then", workload.pid, status, self.options.restart_delay)

    def _on_stop_requested(self, message: StopRequested) -> None:
        self._log.info("received %s; stopping", message.signal_name)
        if self._workload is not None:
            self._stop_workload(f"the guard received {message.signal_name}")
        self._exit_code = 0

    # Acting on the state.

    def _enforce(self) -> None:
        now = self._monotonic()
        trusted = self._trust.trusted_at(now)
        self._log_expiry(now)

        if self._workload is not None and not trusted:
            self._stop_workload(self._stop_reason(now))
            self._stopped_for_verdict = True
            if not self.options.restart:
                self._log.warning("CMD stays stopped because restart is off; restart the guard to run "
                                  "it again")
        elif self._workload is None and trusted and self._may_start(now):
            self._start_workload()

        if now >= self._next_reread:
            self._source.request_reread()
            # The reply reschedules the next reread. This time matters only if no reply arrives.
            self._next_reread = now + self.options.reread_interval

    def _may_start(self, now: float) -> bool:
        if self._stopped_for_verdict and not self.options.restart:
            return False
        return now >= self._restart_not_before

    def _log_expiry(self, now: float) -> None:
        held = self._trust.held
        if (held is None or held.verdict.status is not VerdictStatus.TRUSTED or self._trust.trusted_at(now)
                or self._trust.expiry_logged):
            return
        self._trust.expiry_logged = True
        expires_at = held.verdict.expires_at.isoformat() if held.verdict.expires_at else None
        self._log.warning("verdict %s expired (expires_at %s) with no newer verdict; the device is no "
                          "longer trusted", held.verdict.verdict_id, expires_at)

    def _stop_reason(self, now: float) -> str:
        held = self._trust.held
        if held is None:
            return "no verdict"
        verdict = held.verdict
        if verdict.status is VerdictStatus.TRUSTED:
            expires_at = verdict.expires_at.isoformat() if verdict.expires_at else None
            return f"verdict {verdict.verdict_id} expired at {expires_at} with no newer verdict"
        return (f"verdict {verdict.status.value} (reasons: {verdict.reason_codes}; "
                f"verdict_id {verdict.verdict_id})")

    def _start_workload(self) -> None:
        self._runs += 1
        try:
            workload = Workload.start(self.options.command, self._runs, self._inbox.put, self._log)
        except OSError as error:
            self._log.error("cannot start CMD %r: %s", self.options.command[0], error.strerror or error)
            not_found = isinstance(error, FileNotFoundError)
            self._exit_code = EXIT_COMMAND_NOT_FOUND if not_found else EXIT_COMMAND_NOT_EXECUTABLE
            return
        self._workload = workload
        held = self._trust.held
        verdict_id = held.verdict.verdict_id if held else None
        self._log.info("started CMD (pid %d, run %d): device trusted (verdict_id %s)", workload.pid,
                       workload.run_number, verdict_id)

    def _stop_workload(self, reason: str) -> None:
        workload = self._workload
        assert workload is not None
        self._workload = None
        self._log.warning("stopping CMD (pid %d): %s; sending SIGTERM, SIGKILL after %.1f s", workload.pid,
                          reason, self.options.grace_period)
        returncode, killed = workload.stop(self.options.grace_period)
        if killed:
            self._log.warning("CMD (pid %d) ignored SIGTERM for %.1f s; killed it with SIGKILL", workload.pid,
                              self.options.grace_period)
        else:
            self._log.info("CMD (pid %d) stopped with status %d", workload.pid, exit_status(returncode))

    # Timing.

    def _schedule_reread(self, now: float) -> None:
        self._next_reread = now + self._trusted_cap(self.options.reread_interval, now)

    def _trusted_cap(self, delay: float, now: float) -> float:
        """Shorten ``delay`` to half the time left before a held trusted verdict expires."""
        deadline = self._trust.deadline
        if deadline is None or deadline <= now:
            return delay
        return min(delay, max(MIN_REREAD_DELAY, (deadline - now) / 2))

    def _seconds_to_next_check(self) -> float:
        now = self._monotonic()
        wake_at = [self._next_reread, now + MAX_IDLE_SECONDS]
        if self._trust.deadline is not None and self._trust.deadline > now:
            wake_at.append(self._trust.deadline)
        if self._workload is None and self._restart_not_before > now:
            wake_at.append(self._restart_not_before)
        return min(wake_at) - now
