"""cluster.yaml validated offline by Ray's own launcher code, and the offline demo of the whole chain."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, run


def test_cluster_yaml_is_valid_and_fits_what_the_commands_ask_for():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # raises on a schema error; needs no cloud credentials
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no tasks
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert all(v["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for v in workers.values())
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")  # same Ray as installed
    assert "ray[data,default]>=2.50,<3" in (ROOT / "pyproject.toml").read_text()

    from interposer.pipeline.build import default_requests
    from interposer.trainer.config import TrainConfig
    from interposer.trainer.driver import worker_request

    def fits(request: dict, n: int = 1) -> list[str]:
        return [k for k, v in workers.items() if all(v["resources"].get(r, 0) >= n * q for r, q in request.items())]

    encoder = default_requests()["encoder"]
    assert encoder["GPU"] == 1 and "encode_gpu" in fits(encoder)  # an encoder actor (and its decode threads)
    train = worker_request(TrainConfig.of(gpu=True, workers=4))
    assert train == {"CPU": 1, "GPU": 1}
    assert "train_gpu" in fits(train, n=4)  # `--gpu --workers 4` fits one train node


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain(tmp_path, ray_session):
    from helpers import run

    address = ray_session.get_runtime_context().gcs_address  # the session's local Ray: no second cluster
    result = run("-m", "interposer", "demo", "--quick", "--out", str(tmp_path / "demo"), env={"RAY_ADDRESS": address})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "demo"
    for stage in ("=== 1.", "=== 2.", "=== 3.", "=== 4.", "=== 5.", "=== 6.", "STAND-INS"):
        assert stage in result.stdout
    assert "killed the training driver (SIGKILL)" in result.stdout and "(resumed from step" in result.stdout
    for rel in ("data/v1-xl/manifest.json", "runs/xl-v1/export/model.safetensors", "runs/xl-v1/export/eval.json",
                "astronaut-xl.latent", "astronaut-v1.latent"):
        assert (out / rel).is_file(), rel
    rows = {r["method"]: r for r in json.loads((out / "runs/xl-v1/export/eval.json").read_text())["rows"]}
    assert rows["interposer"]["latent_l1"] < rows["linear"]["latent_l1"]  # it learned more than an affine map
    assert "would push to your-name/xl-to-v1-interposer" in result.stdout


def test_one_import_root(tmp_path):
    """The wheel installs `interposer` only: pipeline/ and trainer/ are interposer.pipeline and
    interposer.trainer (no top-level `pipeline` or `trainer` to overwrite other distributions'), and no
    source file imports them by their folder names (which work only beside the repository)."""
    import re

    code = ("import importlib.util as u, interposer.pipeline.schema, interposer.trainer.data; "
            "print(u.find_spec('pipeline'), u.find_spec('trainer'))")
    result = run("-c", code, cwd=tmp_path)  # away from the repository root
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None None"
    old = re.compile(r"^\s*(from|import) (pipeline|trainer)\b|\"-m\", \"(pipeline|trainer)\"", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("interposer", "pipeline", "trainer", "tests", "bench")
                 for p in (ROOT / folder).rglob("*.py") if old.search(p.read_text())]
    assert offenders == []


def test_the_cleaner_stop_timeout_and_its_traceback_stay_off_the_console(monkeypatch):
    """The lines of CI's failed run (2026-12-07): Ray Train's controller logged its cleaner's stop timing out, with
    a traceback, across two batches. Those go; the lines around them, and other processes' lines, print."""
    import io

    import ray._private.worker as worker

    from interposer import cluster

    monkeypatch.setattr(worker, "print_worker_logs", worker.print_worker_logs)  # undone after the test
    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    cluster._drop_cleaner_lines()
    out = io.StringIO()
    first = ["[train] done: step 4", "2026-12-07 WARNING placement_group_callback.py:131 -- Failed to stop "
             "PlacementGroupCleaner gracefully.", "Traceback (most recent call last):",
             '  File "placement_group_callback.py", line 126, in _stop_cleaner']
    rest = ["    ray.get(self._cleaner.stop.remote(), timeout=self._stop_timeout)",
            "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.", "after the traceback"]
    controller = {"pid": 21141, "actor_name": "TrainController", "ip": "h", "localhost": "h"}
    worker.print_worker_logs({**controller, "lines": first}, out)
    worker.print_worker_logs({"pid": 7, "ip": "h", "localhost": "h", "lines": ["    another process"]}, out)
    worker.print_worker_logs({**controller, "lines": rest}, out)
    worker.print_worker_logs({"pid": 8, "actor_name": "PlacementGroupCleaner", "lines": ["Failed to query"]}, out)
    assert out.getvalue().splitlines() == ["(TrainController pid=21141) [train] done: step 4",
                                           "(pid=7)     another process",
                                           "(TrainController pid=21141) after the traceback"]
    # a line naming the timeout with no traceback after it drops that line only
    skipping = {}
    assert cluster._drop_cleaner_stop({"pid": 1, "lines": [cluster.CLEANER_STOP, "next"]}, skipping) == ["next"]
    assert skipping == {}


@pytest.mark.slow
def test_a_killed_command_leaves_no_local_ray_process_behind(tmp_path):
    """SIGKILL of a command that started local Ray: its watchdog ends what Ray leaves (the raylet's
    DashboardAgent and RuntimeEnvAgent were left running, one ignoring SIGTERM). Only the processes below
    the command this test started are looked at, by pid and start time."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from interposer.cluster import _descendants, _start_time

    code = ("from interposer.cluster import start_ray; start_ray(); print('up', flush=True); "
            "import time; time.sleep(600)")
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1",
           "INTERPOSER_WATCHDOG_LOG": str(tmp_path / "watchdog.log")}
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=env, cwd=tmp_path, text=True)
    try:
        assert driver.stdout.readline().strip() == "up"
        deadline = time.time() + 60
        while time.time() < deadline:  # the raylet starts its agents a moment after ray.init returns
            below = _descendants(driver.pid)
            titles = [open(f"/proc/{p}/cmdline", "rb").read() for p in below if _start_time(p) == below[p]]
            if sum(b"Agent" in t for t in titles) >= 2:
                break
            time.sleep(0.5)
        assert len(below) >= 4, below  # gcs, raylet, the agents, ...
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(_start_time(p) == s for p, s in below.items()):
            time.sleep(0.5)
        left = [p for p, s in below.items() if _start_time(p) == s]
        assert left == [], [open(f"/proc/{p}/cmdline", "rb").read()[:80] for p in left]
        assert "SIGTERM to [" in (tmp_path / "watchdog.log").read_text()  # it was the watchdog that ended them
    finally:
        if driver.poll() is None:
            driver.kill()


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_ray_address_a_command_runs_on_a_ray_of_its_own(tmp_path):
    """The address Ray last recorded on the machine (ray_current_cluster) is never used: with it naming a dead
    cluster, ray.init() retried it for minutes; a live one would have been joined silently."""
    import subprocess
    import sys
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    dead = f"127.0.0.1:{_dead_port()}"
    (Path(ray_tmp) / "ray").mkdir()
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(dead)
    code = ("import ray; from interposer.cluster import start_ray; assert start_ray(); "
            "print(ray.get_runtime_context().gcs_address, flush=True); ray.shutdown()")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp, "INTERPOSER_NO_WATCHDOG": "1"}
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        address = result.stdout.strip().splitlines()[-1]
        assert address != dead and address.rpartition(":")[2].isdigit(), result.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("address", ["DEAD", "ray://DEAD", "auto"])
def test_a_ray_address_that_does_not_answer_fails_in_one_line(address, photos, vaes, tmp_path):
    import tempfile

    dead = f"127.0.0.1:{_dead_port()}"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    if address == "auto":  # what a dead cluster left behind
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(dead)
    result = run("-m", "interposer", "data", "build", "--images", str(photos), "--space", f"v1={vaes['v1']}", "--out",
                 str(tmp_path / "out"), env={"RAY_ADDRESS": address.replace("DEAD", dead), "RAY_TMPDIR": ray_tmp,
                                             "INTERPOSER_RAY_CONNECT_TIMEOUT": "2"})
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no Ray head answers at {dead} within 2 s" in lines[0], result.stderr
    assert "unset RAY_ADDRESS" in lines[0]
    assert not (tmp_path / "out").exists()
