"""Ending child processes with a bound: nothing on the way out of a training process waits on a child for ever.

A DataLoader worker frozen in I/O (an NFS/Lustre read, a socket without timeout, ``SIGSTOP``) never answers
``SIGTERM``: PyTorch's worker shutdown joins it, then sends ``SIGTERM`` and moves on, and Python's
``multiprocessing`` exit handler joins every child again *without a bound* (issue 20: a finished run that
never exited). :func:`end_processes` asks with ``SIGTERM``, waits at most ``timeout`` seconds, then sends
``SIGKILL`` (which a stopped or uninterruptible process cannot refuse) and waits until it has exited, so
the interpreter's own exit finds nothing left to wait for. It does not reap: the object that started a
child (``multiprocessing.Process``, ``subprocess.Popen``) reaps it and so learns of its exit.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable

import psutil

log = logging.getLogger(__name__)


def child_pids() -> set[int]:
    """Pids of this process's children and their descendants, now."""
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def describe(pid: int) -> str:
    """``pid 123 (stopped: SIGSTOP or a debugger)``: a process and its scheduler state, in words a user can act on."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return f"pid {pid} (gone)"
    except psutil.Error:
        return f"pid {pid}"
    words = {psutil.STATUS_STOPPED: "stopped: SIGSTOP or a debugger",
             psutil.STATUS_DISK_SLEEP: "in uninterruptible I/O: a hung file system or device",
             psutil.STATUS_ZOMBIE: "exited, not yet reaped"}
    return f"pid {pid} ({words.get(status, status)})"


def end_processes(pids: Iterable[int], timeout: float = 5.0, why: str = "") -> list[int]:
    """``SIGTERM`` each process (and its descendants), wait up to ``timeout`` s, ``SIGKILL`` the rest.

    Waits (bounded) until each has exited; reaping is left to the object that started it.

    Args:
        pids: The processes to end (gone ones are skipped).
        timeout: Seconds between ``SIGTERM`` and ``SIGKILL``.
        why: Said in the log line when something had to be killed.

    Returns:
        The pids that had to be killed with ``SIGKILL``.
    """
    procs: list[psutil.Process] = []
    for pid in set(pids):
        if pid == os.getpid():
            continue
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    if not procs:
        return []
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    alive = _wait_gone(procs, timeout)
    killed = []
    for proc in alive:
        killed.append(proc.pid)
        _signal(proc, signal.SIGKILL)
    if killed:
        log.warning("killed %s after %g s without exiting on SIGTERM%s", ", ".join(f"pid {p}" for p in killed),
                    timeout, f" ({why})" if why else "")
    _wait_gone(alive, timeout)
    return killed


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited (a zombie counts), without reaping it: the object that started it
    (a ``multiprocessing.Process``, a ``subprocess.Popen``) must see the exit itself, or it believes the child
    alive for ever (``waitpid`` fails with ECHILD once someone else reaped it). Returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _status(p) not in (None, psutil.STATUS_ZOMBIE)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


#: Helpers that serve the whole process and end with it by themselves (they watch their parent), and that no
#: exit waits on: wandb's service (``wandb-core``) and Python's shared-memory ``resource_tracker``. Ending
#: them after a run would break the process's next wandb run or shared-memory use.
PROCESS_HELPERS = ("wandb-core", "multiprocessing.resource_tracker")


def end_new_children(before: set[int], timeout: float = 5.0, why: str = "") -> list[int]:
    """:func:`end_processes` on every child that did not exist in ``before`` (a :func:`child_pids` result).

    Children that existed before (a test's S3 server, a launcher's helpers) and :data:`PROCESS_HELPERS`
    are left alone.
    """
    new = []
    for pid in child_pids() - set(before):
        try:
            command = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if not any(helper in command for helper in PROCESS_HELPERS):
            new.append(pid)
    return end_processes(new, timeout, why)


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _status(proc: psutil.Process) -> str | None:
    try:
        return proc.status()
    except psutil.Error:
        return None


__all__ = ["PROCESS_HELPERS", "child_pids", "describe", "end_processes", "end_new_children"]
