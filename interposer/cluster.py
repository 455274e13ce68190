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


def start_ray(log_to_driver: bool = False) -> bool:
    """Connect to the cluster RAY_ADDRESS names, or start Ray on this machine; True if this call started it.

    Local Ray runs its workers at this command's own priority: Ray's default renices every worker to 15,
    which starves an encoder or trainer beside any other work on a desktop (and makes `nice` meaningless).
    Set RAY_worker_niceness yourself to keep Ray's default."""
    import sys

    import ray

    if ray.is_initialized():
        return False
    if not (sys.stdout.isatty() and sys.stderr.isatty()):  # no colour codes in a file or a pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="warning", log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        _quiet_auth_notice()
        ray.init(logging_level="warning", log_to_driver=log_to_driver, include_dashboard=False)
        start_watchdog()  # a SIGKILLed command leaves no Ray process behind
    return True


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
