"""Helpers for the tests on a real S3 server and a real multi-node Ray cluster (fixtures `s3` and `cluster` in
conftest.py): environments for nodes, commands sent to the cluster as `ray job submit` would send them."""

import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from seaweed import SECRET_KEY

BUCKET = "interposer"
# Every node and every command in one authentication mode: a local ray.init() in the test process (ray_session)
# puts RAY_AUTH_MODE=token in os.environ, and a command in token mode on a cluster without tokens has its
# actors cancelled before they run ("The actor never ran"). Off: the cluster is on loopback.
RAY_ENV = {"RAY_worker_niceness": "0", "RAY_AUTH_MODE": "disabled",
           # a node removed without grace is declared dead after 3 missed health checks 1 s apart, not Ray's
           # 5 x 3 s: the tests wait on that twice (lost node mid-build, mid-train); nothing else changes
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@contextmanager
def environment(values: dict):
    """os.environ with `values` for the duration (None: unset); the nodes started inside inherit it, as a node
    inherits its profile."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def node_ports() -> dict:
    """Ports of a node's own that Ray otherwise fixes (the dashboard agent's HTTP port, 52365): several Ray
    instances on one machine (another test's local Ray, the other nodes) must not meet on them."""
    from seaweed import free_port

    return dict(dashboard_agent_listen_port=free_port())


def add_node(cluster, s3, **env):
    with environment({**s3.env, **RAY_ENV, **env}):
        node = cluster.add_node(num_cpus=1, **node_ports())
    cluster.wait_for_nodes()
    return node


def cli(cluster, s3, *argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    full = {**os.environ, **s3.env, **RAY_ENV, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address, **(env or {})}
    return subprocess.run([sys.executable, "-m", "interposer", *argv], capture_output=True, text=True, env=full,
                          timeout=timeout)


def start(cluster, s3, *argv) -> subprocess.Popen:
    full = {**os.environ, **s3.env, **RAY_ENV, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([sys.executable, "-m", "interposer", *argv], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def registered_steps(s3, run: str) -> list[int]:
    """Checkpoint steps Ray Train has recorded in the run's snapshot in the bucket (only those are resumed)."""
    try:
        snapshot = json.loads(s3.get_bytes(f"{run}/checkpoint_manager_snapshot.json"))
    except (OSError, json.JSONDecodeError):
        return []
    return sorted(int(r["metrics"]["step"]) for r in snapshot["checkpoint_results"])


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SECRET_KEY not in result.stdout + result.stderr
    return result


def digest_s3(s3, uri: str) -> dict[str, str]:
    return {rel: hashlib.sha256(s3.get_bytes(f"{uri}/{rel}")).hexdigest() for rel in s3.list(uri)}


def digest_local(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------- what the cluster runs, so that the end can check it is gone

def node_processes(*nodes) -> dict[int, int]:
    """{pid: start time} of the Ray processes of `nodes` (raylet, object store, GCS, dashboard, ...) and of
    every process below them (the workers)."""
    from interposer._watchdog import descendants, start_time

    found: dict[int, int] = {}
    for info in (i for n in nodes for infos in n.all_processes.values() for i in infos):
        if (born := start_time(info.process.pid)) is not None:
            found[info.process.pid] = born
        found.update(descendants(info.process.pid))
    return found


def remove_node(cluster, node, seen: dict[int, int], graceful: bool = True) -> None:
    """cluster.remove_node, first adding the node's processes to `seen` (checked gone at the end)."""
    seen.update(node_processes(node))
    cluster.remove_node(node, allow_graceful=graceful)


def still_running(processes: dict[int, int], timeout: float = 20.0) -> list[int]:
    """The pids of `processes` still running (same pid, same start time, not a zombie) after up to `timeout`
    s; pids reused by other programs are not ours and do not count."""
    from interposer._watchdog import start_time

    def running(pid: int, born: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return False
        return start_time(pid) == born and state != b"Z"

    deadline = time.time() + timeout
    while (left := [p for p, born in processes.items() if running(p, born)]) and time.time() < deadline:
        time.sleep(0.2)
    return left
