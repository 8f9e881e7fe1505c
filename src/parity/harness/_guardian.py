"""The launcher's guardian: run torchrun as its child and leave no descendant alive when it ends.

    python -S _guardian.py LAUNCHER_PID GRACE_S -- torchrun-command...

Why a separate process: the launcher's own cleanup (``finally`` in :func:`parity.harness.launch.launch`)
cannot run when the launcher is SIGKILLed, ``os._exit``-ed by pytest-timeout, or killed by nox 0.5 s
after a Ctrl-C (nox sends SIGTERM, then SIGKILL 0.2 s later). torchrun starts every rank in its own
session, so when torchrun dies the ranks are re-parented to init and nothing finds them any more.

The guardian is what survives those exits, and it can always find every descendant:

* it marks itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): a rank orphaned by a dying
  torchrun is re-parented to the guardian, not to init, so a walk of the guardian's process tree
  still reaches it;
* it asks for SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``) and also polls its parent pid;
* it runs in its own session (the launcher starts it so), so a terminal's Ctrl-C does not hit it
  and it never dies before it has cleaned up.

On SIGTERM/SIGINT/SIGHUP or the launcher's death it forwards SIGTERM to torchrun (which tears its
ranks down, each dumping its stack through faulthandler), waits ``GRACE_S``, then SIGKILLs every
descendant until none is left. When torchrun exits on its own it SIGKILLs whatever torchrun left
behind and exits with torchrun's status (a torchrun killed by signal N makes it die by signal N).

Standard library only, no parity imports: it starts with ``python -S`` in a few milliseconds and
works whatever environment the job has. Linux gets the prctl guarantees; elsewhere the parent-pid
poll alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.05
KILL_GIVE_UP_S = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_stopped: list[int] = []


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the ppid poll remains
        pass


def _on_signal(signum: int, frame: object) -> None:
    _stopped.append(signum)


def _children_table() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # zombies are already dead; reaping them is enough
            table.setdefault(int(fields[1]), []).append(int(entry))
    return table


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (with the subreaper flag, orphans of torchrun included)."""
    if not os.path.isdir("/proc"):  # pragma: no cover - not Linux
        return []
    table = _children_table()
    found, todo = [], [root]
    while todo:
        for child in table.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _reap(child: int) -> int | None:
    """Collect every exited child (orphans re-parented here too); torchrun's exit code if it ended."""
    status = None
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == child:
            status = os.waitstatus_to_exitcode(raw)


def _kill_all(child_status: int | None, child: int) -> int | None:
    """SIGKILL every descendant until none is left (or give up after KILL_GIVE_UP_S)."""
    give_up = time.monotonic() + KILL_GIVE_UP_S
    while True:
        status = _reap(child)
        child_status = child_status if status is None else status
        alive = descendants(os.getpid())
        if not alive or time.monotonic() > give_up:
            return child_status
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(POLL_S)


def _start(cmd: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # the child: torchrun
        try:
            for sig in _STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)  # an inherited SIG_IGN would reach torchrun too
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the guardian SIGKILLed: torchrun cleans up
            os.execv(cmd[0], cmd)
        finally:
            os._exit(127)
    return pid


def run(launcher: int, grace_s: float, cmd: list[str]) -> int:
    """Supervise ``cmd``; return torchrun's exit code (negative: killed by that signal)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # the launcher died before the death signal was armed
        return 128 + signal.SIGTERM
    child = _start(cmd)
    status = None
    while status is None and not _stopped and os.getppid() == launcher:
        status = _reap(child)
        if status is None:
            time.sleep(POLL_S)
    if status is None:  # told to stop, or the launcher is gone: forward, wait, then kill
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while status is None and time.monotonic() < deadline:
            status = _reap(child)
            if status is None:
                time.sleep(POLL_S)
    status = _kill_all(status, child)
    if status is None:
        return 128 + (_stopped[0] if _stopped else signal.SIGTERM)
    return status


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: python -S _guardian.py LAUNCHER_PID GRACE_S -- command...")
    launcher, grace_s, cmd = int(argv[0]), float(argv[1]), argv[3:]
    code = run(launcher, grace_s, cmd)
    if code < 0:  # mirror a torchrun killed by a signal, so the launcher reports the same status
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1.0)
        code = 128 - code
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
