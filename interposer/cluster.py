"""Starting or joining Ray for the commands that need it (`data build`, `train`, `demo`). Ray is imported only
when called: `interposer` itself never needs it."""

from __future__ import annotations

import os

from ._watchdog import descendants as _descendants, start_time as _start_time  # noqa: F401  (tests use them)


def _quiet_auth_notice() -> None:
    """Ray announces on every local start that token authentication is on (its safe default): noise in a
    command's output. Only that notice is dropped; the warning that authentication is *off* still shows."""
    import logging

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(getattr(f, "interposer", False) for f in logger.filters):
        def drop(record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Token authentication is enabled")

        drop.interposer = True
        logger.addFilter(drop)


CLEANER = "PlacementGroupCleaner"  # Ray Train's detached actor that removes a dead run's placement group
CLEANER_STOP = "Failed to stop PlacementGroupCleaner gracefully"  # its controller's line when stopping it timed out


def _drop_cleaner_stop(data: dict, skipping: dict) -> list:
    """One batch of a worker's lines without the controller's "Failed to stop PlacementGroupCleaner gracefully."
    and its traceback. Ray Train waits 12 s for the cleaner to stop, and the cleaner may itself wait that long on
    its last state query, so a busy machine logs this at the end of a run that went well. A traceback may span
    batches: `skipping` holds, per process, where in it the last batch ended ("start" or "frames")."""
    pid, kept = data.get("pid"), []
    for line in data.get("lines", []):
        state = skipping.get(pid)
        if CLEANER_STOP in line:
            skipping[pid] = "start"
        elif state == "start" and line.startswith("Traceback"):
            skipping[pid] = "frames"
        elif state == "frames":
            if not line[:1].isspace():  # the exception's own line ends the traceback
                del skipping[pid]
        else:
            skipping.pop(pid, None)  # no traceback followed
            kept.append(line)
    return kept


def _drop_cleaner_lines() -> None:
    """Keep Ray Train's PlacementGroupCleaner off the console. It asks Ray's state API (served by the dashboard)
    once a second whether the run's controller is alive: without a dashboard (local Ray) each ask prints
    "Failed to query Ray Train Controller actor state", and with several Ray instances on one machine it
    dies with a traceback; stopping it can time out (see _drop_cleaner_stop). Its lines still go to Ray's log
    files (session_latest/logs/worker-*). Ray has no public filter for the worker output it forwards to the
    driver, so this wraps the one function that prints it (ray._private.worker.print_worker_logs); everything
    else prints as before."""
    import ray._private.worker as worker

    if getattr(worker.print_worker_logs, "interposer", False):
        return
    original, skipping = worker.print_worker_logs, {}

    def print_worker_logs(data, print_file, ignore_prefix=False):
        if CLEANER in (data.get("actor_name"), data.get("task_name")):
            return
        lines = _drop_cleaner_stop(data, skipping)
        if lines:
            original({**data, "lines": lines}, print_file, ignore_prefix)

    print_worker_logs.interposer = True
    worker.print_worker_logs = print_worker_logs


def start_ray(log_to_driver: bool = False) -> bool:
    """Connect to the cluster RAY_ADDRESS names, or start Ray on this machine; True if this call started it.

    Local Ray runs its workers at this command's own priority: Ray's default renices every worker to 15,
    which starves an encoder or trainer beside any other work on a desktop (and makes `nice` meaningless).
    Set RAY_worker_niceness yourself to keep Ray's default."""
    import sys

    import ray

    if ray.is_initialized():
        return False
    if log_to_driver:
        _drop_cleaner_lines()
    if not (sys.stdout.isatty() and sys.stderr.isatty()):  # no colour codes in a file or a pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        check_cluster_answers(address)
        ray.init(address=address, logging_level="warning", log_to_driver=log_to_driver)
    else:
        # "local": a Ray of our own, never the cluster Ray last recorded on this machine
        # (/tmp/ray/ray_current_cluster), which may be dead (ray.init would retry it for minutes) or someone
        # else's (the command would silently run there)
        os.environ.setdefault("RAY_worker_niceness", "0")
        _quiet_auth_notice()
        ray.init(address="local", logging_level="warning", log_to_driver=log_to_driver, include_dashboard=False)
        start_watchdog()  # a SIGKILLed command leaves no Ray process behind
    return True


class ClusterUnreachable(ConnectionError):
    """RAY_ADDRESS names a cluster that does not answer (a machine fault: one line, exit 1)."""


def connect_timeout() -> float:
    """Seconds to wait for RAY_ADDRESS's head to answer (INTERPOSER_RAY_CONNECT_TIMEOUT, default 20)."""
    return float(os.environ.get("INTERPOSER_RAY_CONNECT_TIMEOUT", "20"))


def check_cluster_answers(address: str, timeout: float | None = None) -> None:
    """Fail in one line, within `timeout` seconds, when nothing listens at RAY_ADDRESS's head (ray.init
    would retry a dead GCS for a minute or more, printing only its own warnings). 'auto' is the address
    Ray recorded on this machine; ray:// (Ray Client) and host:port are probed directly."""
    import socket
    import time

    timeout = connect_timeout() if timeout is None else timeout
    target = address.removeprefix("ray://")
    if target == "auto":
        from ray._private.utils import read_ray_address  # what `ray.init("auto")` reads first

        target = read_ray_address() or ""
        if not target:
            raise ClusterUnreachable("RAY_ADDRESS=auto, but no Ray cluster was started on this machine "
                                     "(`ray start --head`); set RAY_ADDRESS to the head's host:port, or unset it to "
                                     "run on a Ray of this command's own")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RAY_ADDRESS={address!r}: expected HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379), "
                         "ray://HOST:PORT, or auto")
    deadline, error = time.monotonic() + timeout, None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(2.0, timeout))):
                return
        except OSError as e:
            error = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise ClusterUnreachable(f"RAY_ADDRESS={address}: no Ray head answers at {host}:{port} within {timeout:g} s "
                             f"({getattr(error, 'strerror', None) or error}); start the cluster (`ray up`, "
                             "`ray start --head`) or unset RAY_ADDRESS to run on a Ray of this command's own")


# ------------------------------------------------------------------ local Ray after its driver is killed
# Local Ray's processes are children of the command that started it. When that command is SIGKILLed, Ray
# stops most of them itself, but its DashboardAgent and RuntimeEnvAgent (children of the raylet) are left
# running, one of them ignoring SIGTERM. A watchdog (interposer/_watchdog.py, a stand-alone script: it
# starts in milliseconds, importing nothing of ours) remembers the command's descendants, by pid and start
# time, while it runs and ends those still alive once it is gone: only processes this command started,
# named by id, never by a name found in `ps`.

def start_watchdog(timeout: float = 10.0) -> None:
    """Start the watchdog for this process and wait for its first look (Linux; a no-op elsewhere). It runs
    in its own session, so a kill of this command's process group does not take it along."""
    import select
    import subprocess
    import sys

    if not os.path.isdir("/proc") or os.environ.get("INTERPOSER_NO_WATCHDOG"):
        return
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_watchdog.py")
    proc = subprocess.Popen([sys.executable, "-S", script, str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if ready:
        proc.stdout.readline()
    proc.stdout.close()
