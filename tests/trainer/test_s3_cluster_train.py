"""Training from and to a real S3 server on a real three-node Ray cluster (fixtures `s3`, `cluster`): 2 ranks, one
per worker node; a node lost after the first checkpoint, then the driver lost. Both runs must end with the
weights of the uninterrupted local run (`reference`), bit for bit."""

import json
import os
import re
import signal
import time

import yaml

from clusters import BUCKET, add_node, cli, ok, start
from helpers import TINY_TRAIN as TINY


def _registered_steps(s3, run: str) -> list[int]:
    """Checkpoint steps Ray Train has recorded in the run's snapshot in the bucket (only those are resumed)."""
    try:
        snapshot = json.loads(s3.get_bytes(f"{run}/checkpoint_manager_snapshot.json"))
    except (OSError, json.JSONDecodeError):
        return []
    return sorted(int(r["metrics"]["step"]) for r in snapshot["checkpoint_results"])


def _wait_for_checkpoint(s3, run: str, proc, timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = _registered_steps(s3, run)
        if steps:
            return steps
        time.sleep(0.1)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"no checkpoint appeared in {run} (exit code {proc.poll()}): {out[-8000:]}")


def test_train_in_s3_on_two_nodes_survives_a_lost_node_and_a_lost_driver(cluster, s3, dataset, reference, tmp_path):
    data, runs = f"s3://{BUCKET}/datasets/train-xl-v1", f"s3://{BUCKET}/runs"
    s3.put_folder(dataset, data)  # the very dataset `reference` trained on, now in the bucket
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k not in ("src", "dst")}))
    argv = ["train", "--data", data, "--src", "xl", "--dst", "v1", "--out", runs, "--config", str(config)]
    expected = (reference / "export" / "model.safetensors").read_bytes()

    # a worker node lost without grace after the first checkpoint: Ray Train resumes by itself on a new node
    proc = start(cluster, s3, *argv, "--name", "lost-node")
    try:
        steps = _wait_for_checkpoint(s3, f"{runs}/lost-node", proc)
        cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
        add_node(cluster, s3)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert max(steps) < TINY["steps"], "the loss should land mid-run"
    resumed = [int(s) for s in re.findall(r"\[train\] resuming from step (\d+)", out)]
    assert resumed and resumed[0] >= max(steps), out[-3000:]
    assert s3.get_bytes(f"{runs}/lost-node/export/model.safetensors") == expected

    # the driver lost (the whole job): the same command resumes from the latest checkpoint in the bucket
    proc = start(cluster, s3, *argv, "--name", "lost-driver")
    try:
        _wait_for_checkpoint(s3, f"{runs}/lost-driver", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = ok(cli(cluster, s3, *argv, "--name", "lost-driver"))
    assert "(resuming)" in result.stdout and "resumed from step" in result.stdout, result.stdout[-2000:]
    assert s3.get_bytes(f"{runs}/lost-driver/export/model.safetensors") == expected

    # evaluated and staged for the Hub straight from the bucket
    result = ok(cli(cluster, s3, "eval", "--model", f"{runs}/lost-node", "--data", data, "--limit", "4"))
    assert f"wrote {runs}/lost-node/export/eval.json" in result.stdout
    assert "eval.json" in s3.list(f"{runs}/lost-node/export")
    result = ok(cli(cluster, s3, "publish", "--model", f"{runs}/lost-node", "--repo", "me/xl-to-v1", "--dry-run"))
    assert "would push to me/xl-to-v1" in result.stdout and "eval.json" in result.stdout
