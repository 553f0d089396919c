"""Termination signals that work even when a rank is stuck.

Python runs a signal handler only when the main thread next executes Python code. A rank blocked in a
collective (a gloo/NCCL wait in C++) or in a data wait that never ends therefore ignores SIGTERM: the
preemption handler records the request and waits for a batch end that never comes, and Slurm's step
outlives its job as an orphan (issue 12). :class:`SignalWatchdog` hears signals on another thread through
``signal.set_wakeup_fd`` (the C-level handler writes the signal number to a pipe at once, whatever the
main thread is doing) and bounds the wait:

* the first SIGTERM/SIGUSR1 asks for a checkpoint at the next batch end (the Python handler, as before);
* if that batch end does not begin the checkpoint within ``grace`` seconds, or on a second SIGTERM, every
  thread's stack goes to stderr, child processes (DataLoader workers) are killed, and the process exits
  with ``128 + signal``;
* once the checkpoint is written (:meth:`SignalWatchdog.exit_within`, for a process that owns its exit),
  the process has ``grace`` seconds to be gone, and any SIGTERM ends it at once, with the "stopped,
  resumable" code :data:`~tread_scale.cluster.exit_codes.EXIT_STOPPED`: the checkpoint is safe.

The watchdog stays armed until :meth:`SignalWatchdog.stop`; a ``tread-scale train`` process never calls it,
so a second SIGTERM works until the process is gone (issue 20: one that arrived after training had
finished used to do nothing).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time

from tread_scale.cluster.diagnostics import dump_threads

log = logging.getLogger(__name__)


class SignalWatchdog:
    """Bounds how long a process may take to act on a termination signal. See the module docstring.

    Args:
        signals: The signals that request a checkpoint-and-stop (their Python handlers must be installed
            by the caller; the watchdog only listens).
        grace: Seconds from the first signal to the start of the checkpoint before the process exits.
    """

    def __init__(self, signals: tuple[signal.Signals, ...], grace: float = 30.0) -> None:
        self.signals = {int(s) for s in signals}
        self.grace = float(grace)
        self._acknowledged = threading.Event()
        self._stop = threading.Event()
        self._exit: tuple[float, int, str] | None = None  # (deadline, exit code, what was done)
        self._read_fd: int | None = None
        self._previous_fd = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start listening (call from the main thread, after installing the signal handlers)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._read_fd, self._write_fd = read_fd, write_fd
        self._thread = threading.Thread(target=self._run, name="tread-signal-watchdog", daemon=True)
        self._thread.start()

    def acknowledge(self) -> None:
        """The requested checkpoint has begun: the grace bound no longer applies (a second SIGTERM still does)."""
        self._acknowledged.set()

    def exit_within(self, seconds: float, code: int, done: str) -> None:
        """The work is saved (``done`` says what): be gone within ``seconds``, else exit with ``code``.

        From now on a SIGTERM also exits at once with ``code``. Only for a process that owns its exit (the
        CLI); a caller that goes on after training (a test, a notebook) must not call it.
        """
        self._exit = (time.monotonic() + float(seconds), int(code), done)

    def stop(self) -> None:
        """Stop listening and give the wakeup fd back (call from the main thread)."""
        if self._thread is None:
            return
        self._stop.set()
        signal.set_wakeup_fd(self._previous_fd)
        self._thread.join(timeout=5)
        for fd in (self._read_fd, self._write_fd):
            os.close(fd)
        self._thread = None

    def _run(self) -> None:
        try:
            self._listen()
        except Exception:  # noqa: BLE001 - never die silently: the process would lose its SIGTERM bound
            log.exception("the signal watchdog stopped; SIGTERM is no longer bounded in this process")

    def _listen(self) -> None:
        # poll, not select: select() cannot watch a descriptor >= 1024, and a training process (or a test
        # session training in-process) can hold that many open files (seen in CI: the thread died)
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        first: tuple[float, int] | None = None
        while not self._stop.is_set():
            wait = 0.5
            if self._exit is not None:
                deadline, code, done = self._exit
                if time.monotonic() >= deadline:
                    self._die(f"{done}, but the process was not gone within the bound after it", code=code)
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if first is not None and not self._acknowledged.is_set():
                left = first[0] + self.grace - time.monotonic()
                if left <= 0:
                    self._die(f"{signal.Signals(first[1]).name} received {self.grace:g} s ago and no batch end "
                              "began the checkpoint (a stuck data wait or collective)", first[1])
                wait = min(wait, left)
            if not poller.poll(max(0, int(wait * 1000))):
                continue
            for signum in os.read(self._read_fd, 64):
                if signum not in self.signals:
                    continue
                if self._exit is not None and signum == signal.SIGTERM:
                    self._die(f"SIGTERM received after {self._exit[2]}", code=self._exit[1], dump=False)
                elif first is None:
                    first = (time.monotonic(), signum)
                    log.warning("%s received: checkpointing at the next batch end; exiting if none begins within "
                                "%g s", signal.Signals(signum).name, self.grace)
                elif signum == signal.SIGTERM:
                    self._die("a second SIGTERM received", signum)

    def _die(self, reason: str, signum: int = 0, code: int | None = None, dump: bool = True) -> None:
        if dump:
            dump_threads(f"exiting: {reason}")
        else:
            log.warning("exiting: %s", reason)
        try:
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
        except Exception:  # noqa: BLE001 - exiting regardless; workers also exit when their parent dies
            pass
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(128 + signum if code is None else code)
