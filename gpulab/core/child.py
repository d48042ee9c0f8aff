"""Child process groups that end with their parent.

A child started in a session of its own (``start_new_session=True``: ncu and the program it profiles,
torchrun and its ranks) can be killed as a whole with ``os.killpg``, but a signal sent to the parent's group
(``timeout`` in the device scripts, Ctrl-C, a job scheduler) no longer reaches it: the parent would die and
leave the child running on the GPU. :func:`killed_with_parent` closes that gap for as long as the child runs:
SIGTERM, SIGINT or SIGHUP to the parent first SIGKILLs the child's group, then takes the parent's own
handling (default: ending it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs...), read from /proc; [] where there is none (not Linux)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for e in entries:
        try:
            with open(f"/proc/{e}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads and every process below it (a no-op once they are gone):
    torchrun starts its ranks in sessions of their own, which its group does not hold."""
    below = descendants(proc.pid)  # before the kill: then they would be the init process's
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def handling(handler, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[bool]:
    """While inside: ``handler`` for each of ``signals`` that is not ignored (a signal that whoever started this
    process ignores stays ignored), the earlier handlers after. Yields whether the handlers were installed: only
    the main thread can set them."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield True
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


@contextmanager
def killed_with_parent(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """While inside: a terminating signal to this process kills ``proc``'s group first (``proc`` must lead its
    own group: ``start_new_session=True``). Outside the main thread (where Python cannot set handlers) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield proc
        return
    previous = {}

    def handler(signum, frame):
        kill_group(proc)
        old = previous.get(signum)
        signal.signal(signum, old if old is not None else signal.SIG_DFL)
        if callable(old):
            old(signum, frame)
        else:
            os.kill(os.getpid(), signum)

    for s in SIGNALS:
        if signal.getsignal(s) is signal.SIG_IGN:  # ignored (nohup's SIGHUP): this process goes on, so does proc
            continue
        previous[s] = signal.getsignal(s)
        signal.signal(s, handler)
    try:
        yield proc
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
