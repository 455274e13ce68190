"""Starting or joining Ray for the commands that need it (`data build`, `train`, `demo`). Ray is imported only
when called: `interposer` itself never needs it."""

from __future__ import annotations

import os


def start_ray(log_to_driver: bool = False) -> bool:
    """Connect to the cluster RAY_ADDRESS names, or start Ray on this machine; True if this call started it.

    Local Ray runs its workers at this command's own priority: Ray's default renices every worker to 15,
    which starves an encoder or trainer beside any other work on a desktop (and makes `nice` meaningless).
    Set RAY_worker_niceness yourself to keep Ray's default."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="warning", log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(logging_level="warning", log_to_driver=log_to_driver, include_dashboard=False)
    return True
