"""Datasets and runs in a real S3 server (SeaweedFS on loopback), on a real three-node Ray cluster on this machine
(a head with no CPUs, as cluster.yaml's, and two one-CPU worker nodes, each its own raylet and object store), with
worker nodes lost without grace mid-build and mid-train. Every command goes through the CLI, as `ray job submit`
sends it, with RAY_ADDRESS naming the cluster and the S3 settings in the standard AWS variables."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_TRAIN
from seaweed import SECRET_KEY, SeaweedS3

BUCKET = "interposer"
BUILD = ["--tile-size", "64", "--max-tiles", "2", "--min-size", "64", "--shard-size", "1", "--gpus-per-worker", "0",
         "--workers", "2"]


@contextmanager
def environment(values: dict):
    """os.environ with `values` for the duration (the nodes started inside inherit them, as a node's profile)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        server.bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def cluster(s3):
    from ray.cluster_utils import Cluster

    with environment({**s3.env, "RAY_worker_niceness": "0"}):
        c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0), shutdown_at_exit=False)
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()  # every process of every node, by the pids the Cluster started


def add_node(cluster, s3, **env):
    with environment({**s3.env, "RAY_worker_niceness": "0", **env}):
        node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return node


def cli(cluster, s3, *argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    full = {**os.environ, **s3.env, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address, **(env or {})}
    return subprocess.run([sys.executable, "-m", "interposer", *argv], capture_output=True, text=True, env=full,
                          timeout=timeout)


def start(cluster, s3, *argv) -> subprocess.Popen:
    full = {**os.environ, **s3.env, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([sys.executable, "-m", "interposer", *argv], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SECRET_KEY not in result.stdout + result.stderr
    return result


def digest_s3(s3, uri: str) -> dict[str, str]:
    return {rel: hashlib.sha256(s3.get_bytes(f"{uri}/{rel}")).hexdigest() for rel in s3.list(uri)}


def digest_local(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos_in_s3(s3, tmp_path_factory):
    """24 distinct photos (crops of scikit-image's) in s3://BUCKET/photos/: with --shard-size 1, 24 shards."""
    import skimage

    folder = tmp_path_factory.mktemp("s3-photos")
    source = Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB")
    rng = np.random.default_rng(0)
    for i in range(24):
        x, y = (int(v) for v in rng.integers(0, 512 - 160, 2))
        source.crop((x, y, x + 160, y + 160)).save(folder / f"crop-{i:02d}.png")
    s3.put_folder(folder, f"s3://{BUCKET}/photos")
    return f"s3://{BUCKET}/photos/"


def test_build_to_s3_survives_a_lost_node_and_equals_a_local_build(cluster, s3, photos_in_s3, vaes, tmp_path):
    spaces = ["--space", f"v1={vaes['v1']}", "--space", f"xl={vaes['xl']}"]
    local = tmp_path / "local"
    ok(cli(cluster, s3, "data", "build", "--images", photos_in_s3, *spaces, *BUILD, "--out", str(local)))
    shards = len(list((local / "images").glob("part-*.parquet")))
    assert shards >= 12

    uri = f"s3://{BUCKET}/datasets/lost-node"
    proc = start(cluster, s3, "data", "build", "--images", photos_in_s3, *spaces, *BUILD, "--out", uri)
    deadline, done = time.time() + 240, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            done = len([r for r in s3.list(f"{uri}/images") if r.endswith(".parquet")])
            if done >= shards // 3:
                break
            time.sleep(0.05)
        assert shards // 3 <= done < shards, f"the node loss should land after a third of the shards ({done})"
        victim = next(iter(cluster.worker_nodes))
        cluster.remove_node(victim, allow_graceful=False)  # its raylet, object store and workers, all at once
        add_node(cluster, s3)  # a replacement, as the autoscaler starts one
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:  # the build may stop on the loss: the same command finishes it
        ok(cli(cluster, s3, "data", "build", "--images", photos_in_s3, *spaces, *BUILD, "--out", uri))
    assert digest_s3(s3, uri) == digest_local(local)  # every shard once, byte for byte, manifest included

    result = ok(cli(cluster, s3, "data", "inspect", uri))
    assert f"{uri}  (complete)" in result.stdout and "24 unique images" in result.stdout
    ok(cli(cluster, s3, "data", "add-space", "--data", uri, "--space", f"v3={vaes['v3']}", "--workers", "2",
           "--gpus-per-worker", "0"))
    assert len([r for r in s3.list(f"{uri}/latents/v3") if r.endswith(".parquet")]) == shards
