"""Ends what local Ray leaves behind when the command that started it is killed (see interposer.cluster).

    python -S _watchdog.py DRIVER_PID          (started by interposer.cluster.start_watchdog)

A stand-alone script, standard library only, so that it is watching within milliseconds of the start.
While DRIVER_PID runs it records DRIVER_PID's descendants (pid and start time) every half second; once the
driver is gone it waits for Ray's own shutdown, then sends SIGTERM and, to what is left, SIGKILL, only to
recorded processes whose start time still matches (a reused pid is never hit). Prints "ready" after its
first look. Set INTERPOSER_WATCHDOG_LOG=FILE to have it write what it does.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if (start := start_time(child)) is not None:
                out[child] = start
                todo.append(child)
    return out


def watch(driver: int, every: float = 0.5, grace: float = 5.0) -> None:
    own, known = os.getpid(), {}
    path = os.environ.get("INTERPOSER_WATCHDOG_LOG")
    log = open(path, "a") if path else None  # noqa: SIM115
    born = start_time(driver)
    first = True
    while born is not None and start_time(driver) == born:
        known.update({p: s for p, s in descendants(driver).items() if p != own})
        if first:
            print("ready", flush=True)
            first = False
        time.sleep(every)
    time.sleep(grace)  # Ray's own shutdown runs first (a clean exit leaves nothing for us)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p, s in known.items() if start_time(p) == s]
        if log:
            print(f"driver {driver} gone; {len(known)} recorded; {sig.name} to {left}", file=log, flush=True)
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not left:
            return
        time.sleep(grace)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
