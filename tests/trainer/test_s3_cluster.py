"""Datasets and runs in a real S3 server (SeaweedFS on loopback), on a real three-node Ray cluster on this machine
(a head with no CPUs, as cluster.yaml's, and two one-CPU worker nodes, each its own raylet and object store), with
worker nodes lost without grace mid-build and mid-train, and the driver lost mid-train. Every command goes through
the CLI, as `ray job submit` sends it, with RAY_ADDRESS naming the cluster and the S3 settings in the standard AWS
variables. The server and the cluster live for this module only (their processes would slow every later test)."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clusters import BUCKET, add_node, cli, digest_local, digest_s3, ok, registered_steps, remove_node, start
from helpers import TINY_TRAIN as TINY

pytestmark = pytest.mark.slow  # a real S3 server and a three-node Ray cluster (make test-fast skips)

BUILD = ["--tile-size", "64", "--max-tiles", "2", "--min-size", "64", "--shard-size", "1", "--gpus-per-worker", "0",
         "--workers", "2"]


@pytest.fixture(scope="module")
def photos_in_s3(s3, tmp_path_factory):
    """16 distinct photos (crops of scikit-image's) in s3://BUCKET/photos/: with --shard-size 1, 16 shards."""
    import skimage

    folder = tmp_path_factory.mktemp("s3-photos")
    source = Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB")
    rng = np.random.default_rng(0)
    for i in range(16):
        x, y = (int(v) for v in rng.integers(0, 512 - 160, 2))
        source.crop((x, y, x + 160, y + 160)).save(folder / f"crop-{i:02d}.png")
    s3.put_folder(folder, f"s3://{BUCKET}/photos")
    return f"s3://{BUCKET}/photos/"


def _spaces(vaes) -> list[str]:
    return ["--space", f"v1={vaes['v1']}", "--space", f"xl={vaes['xl']}"]


@pytest.fixture(scope="module")
def local_build(cluster, s3, photos_in_s3, vaes, tmp_path_factory) -> Path:
    """The photos in the bucket built on the cluster into a local folder, uninterrupted: what every build to S3
    must equal, byte for byte."""
    local = tmp_path_factory.mktemp("local-build") / "data"
    ok(cli(cluster, s3, "data", "build", "--images", photos_in_s3, *_spaces(vaes), *BUILD, "--out", str(local)))
    return local


def _landed(s3, uri: str) -> int:
    return len([r for r in s3.list(f"{uri}/images") if r.endswith(".parquet")])


def test_build_to_s3_survives_a_lost_node_then_a_lost_driver_and_equals_a_local_build(cluster, s3, photos_in_s3,
                                                                                       vaes, local_build):
    """A worker node lost without grace once a third of the shards are in the bucket (a replacement joins, as the
    autoscaler starts one), then the driver SIGKILLed (with its process group) at two thirds: the same command
    finishes the build, encoding only what is missing, byte for byte the local build; add-space then works on it."""
    spaces, local = _spaces(vaes), local_build
    shards = len(list((local / "images").glob("part-*.parquet")))
    assert shards >= 8

    uri = f"s3://{BUCKET}/datasets/faults"
    argv = ["data", "build", "--images", photos_in_s3, *spaces, *BUILD, "--out", uri]
    proc = start(cluster, s3, *argv)
    deadline, done, lost, joining, joined = time.time() + 240, 0, False, None, []
    try:
        while time.time() < deadline and proc.poll() is None and done < 2 * shards // 3:
            done = _landed(s3, uri)
            if not lost and done >= shards // 3:
                assert done < shards, f"the node loss should land after a third of the shards ({done})"
                victim = next(iter(cluster.worker_nodes))
                remove_node(cluster, victim, cluster.removed, graceful=False)  # raylet, object store, workers
                # the replacement joins on a thread: the build goes on meanwhile, and waiting here for the join
                # let CI's build finish every shard before the driver kill
                joining = threading.Thread(target=lambda: joined.append(add_node(cluster, s3)))
                joining.start()
                lost = True
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if joining is not None:
            joining.join()
    assert joining is None or joined, "the replacement node did not join (its error is printed above)"
    landed = _landed(s3, uri)
    assert lost and shards // 3 <= landed < shards, landed
    assert not json.loads(s3.get_bytes(f"{uri}/manifest.json"))["complete"]
    result = ok(cli(cluster, s3, *argv))
    assert f"resuming {uri}" in result.stdout, result.stdout[-2000:]
    todo = int(re.search(r"(\d+) shards, (\d+) to encode", result.stdout).group(2))
    assert todo <= shards - landed, result.stdout[-2000:]  # the landed shards are not encoded again
    assert digest_s3(s3, uri) == digest_local(local)  # every shard once, byte for byte, manifest included

    result = ok(cli(cluster, s3, "data", "inspect", uri))
    assert f"{uri}  (complete)" in result.stdout and "16 unique images" in result.stdout
    ok(cli(cluster, s3, "data", "add-space", "--data", uri, "--space", f"v3={vaes['v3']}", "--workers", "2",
           "--gpus-per-worker", "0"))
    assert len([r for r in s3.list(f"{uri}/latents/v3") if r.endswith(".parquet")]) == shards


def test_ray_job_submit_runs_the_readme_recipe_on_the_cluster(cluster, s3, photos_in_s3, vaes, local_build):
    """`ray job submit -- interposer data build ...` through the head's Jobs API, as the README's cluster recipe
    runs it: the entrypoint runs on the head with RAY_ADDRESS set by Ray, the S3 settings of the head's profile."""
    import subprocess
    import sys

    uri = f"s3://{BUCKET}/datasets/job-submitted"
    dashboard = "http://" + cluster.head_node.address_info["webui_url"]
    entrypoint = [sys.executable, "-m", "interposer", "data", "build", "--images", photos_in_s3, *_spaces(vaes),
                  *BUILD, "--out", uri]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    deadline = time.time() + 120
    while True:  # right after nodes come and go the head may not know a job agent yet: Ray says to try again
        result = subprocess.run([ray_cli, "job", "submit", "--address", dashboard, "--runtime-env-json",
                                 json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}), "--", *entrypoint],
                                capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
        if "No available agent to submit job" not in result.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[data] done:" in result.stdout  # our own progress, streamed back by the Jobs API
    assert digest_s3(s3, uri) == digest_local(local_build)


@pytest.mark.parametrize("case, argv, env, code, message", [
    ("no bucket", ["data", "build", "--images", "PHOTOS", "--out", "s3://no-such-bucket/d"], {}, 2,
     "--out s3://no-such-bucket/d: the bucket 'no-such-bucket' does not exist on http://127.0.0.1:"),
    ("no bucket", ["data", "build", "--images", "s3://no-such-bucket/photos/", "--out", "OUT"], {}, 2,
     "--images s3://no-such-bucket/photos/: the bucket 'no-such-bucket' does not exist"),
    ("no prefix", ["data", "build", "--images", f"s3://{BUCKET}/no-photos/", "--out", "OUT"], {}, 2,
     f"image source not found: s3://{BUCKET}/no-photos/ (no object or prefix of that name)"),
    ("wrong keys", ["data", "build", "--images", "PHOTOS", "--out", "OUT"],
     {"AWS_SECRET_ACCESS_KEY": "wrong-secret-never-printed"}, 2,
     "the S3 server refused the credentials; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("dead endpoint", ["data", "build", "--images", "PHOTOS", "--out", "OUT"], {"AWS_ENDPOINT_URL": "DEAD"}, 1,
     "no S3 server answers at DEAD (AWS_ENDPOINT_URL) within 5 s"),
    ("not a dataset", ["train", "--data", "PHOTOS", "--src", "xl", "--dst", "v1", "--out", f"s3://{BUCKET}/runs",
                       "--name", "x"], {}, 2, "--data PHOTOS: no manifest.json; not a dataset"),
    ("not a dataset", ["data", "add-space", "--data", "PHOTOS", "--space", "v3"], {}, 2, "no manifest.json"),
    ("not a run", ["eval", "--model", "PHOTOS", "--data", "PHOTOS"], {}, 2, "neither a run folder"),
])  # fmt: skip
def test_s3_mistakes_and_faults_are_one_line_and_write_nothing(case, argv, env, code, message, s3, photos_in_s3,
                                                               vaes):
    import subprocess
    import sys

    from seaweed import free_port

    out = f"s3://{BUCKET}/mistakes/{case.replace(' ', '-')}"
    dead = f"http://127.0.0.1:{free_port()}"
    argv = [a.replace("PHOTOS", photos_in_s3).replace("OUT", out) for a in argv]
    if argv[:2] == ["data", "build"]:
        argv += ["--space", f"v1={vaes['v1']}", "--tile-size", "64"]
    env = {k: v.replace("DEAD", dead) for k, v in env.items()}
    full = {**os.environ, **s3.env, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", **env}
    result = subprocess.run([sys.executable, "-m", "interposer", *argv], capture_output=True, text=True, env=full,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and message.replace("PHOTOS", photos_in_s3).replace("DEAD", dead) in lines[0], lines
    assert "wrong-secret" not in result.stdout + result.stderr and s3.env["AWS_SECRET_ACCESS_KEY"] not in lines[0]
    assert s3.list(out) == []  # nothing half-written in the bucket


def test_a_node_without_the_s3_settings_is_named_in_one_line(cluster, s3, photos_in_s3, vaes):
    uri = f"s3://{BUCKET}/datasets/bare-node"
    bare = add_node(cluster, s3, **{k: None for k in s3.env})  # a node whose profile lacks the S3 settings
    try:
        result = cli(cluster, s3, "data", "build", "--images", photos_in_s3, "--space", f"v1={vaes['v1']}", *BUILD,
                     "--out", uri)
    finally:
        remove_node(cluster, bare, cluster.removed)
    lines = [line for line in result.stderr.strip().splitlines() if "error:" in line]
    assert result.returncode == 1 and len(lines) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert " on node " in lines[0] and "this node has no AWS_ENDPOINT_URL" in lines[0], lines[0]
    assert "cluster.yaml" in lines[0] and s3.env["AWS_SECRET_ACCESS_KEY"] not in result.stderr
    assert s3.list(uri) == []  # refused before anything was written


def test_a_local_path_missing_on_a_node_is_named_in_one_line(cluster, s3, tmp_path):
    """What every command that loads a VAE from this machine's disk checks on a cluster: each node sees the path
    (nodes on other hosts do not share this disk; here every node shares it, so the path is missing on all)."""
    code = ("import ray; from interposer.pipeline.run import check_nodes; ray.init(); "
            f"check_nodes(ray, [], [({str(tmp_path / 'vae')!r}, '--space v1=VAE')])")
    import subprocess
    import sys

    from clusters import RAY_ENV

    env = {**os.environ, **s3.env, **RAY_ENV, "RAY_ADDRESS": cluster.address}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interposer.pipeline.run.NodeSettingsError: --space v1=VAE: ") and "is not on node" in last
    assert "cluster.yaml's file_mounts" in last, last


def _wait_for_checkpoint(s3, run: str, proc, timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = registered_steps(s3, run)
        if steps:
            return steps
        time.sleep(0.1)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"no checkpoint appeared in {run} (exit code {proc.poll()}): {out[-8000:]}")


def test_train_in_s3_on_two_nodes_survives_a_lost_node_and_a_lost_driver(cluster, s3, dataset, reference, tmp_path):
    """2 ranks, one per worker node. A node lost after the first checkpoint: Ray Train resumes by itself on a new
    node and checkpoints again; then the driver lost (the whole job): the same command resumes from the latest
    checkpoint in the bucket. The run must end with the weights of the uninterrupted local run (`reference`), bit
    for bit."""
    import threading

    data, runs = f"s3://{BUCKET}/datasets/train-xl-v1", f"s3://{BUCKET}/runs"
    s3.put_folder(dataset, data)  # the very dataset `reference` trained on, now in the bucket
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k not in ("src", "dst")}))
    argv = ["train", "--data", data, "--src", "xl", "--dst", "v1", "--out", runs, "--config", str(config),
            "--name", "faults"]
    expected = (reference / "export" / "model.safetensors").read_bytes()

    proc, lines = start(cluster, s3, *argv), []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # never a full pipe
    reader.start()
    try:
        steps = _wait_for_checkpoint(s3, f"{runs}/faults", proc)
        assert max(steps) < TINY["steps"], "the loss should land mid-run"
        remove_node(cluster, next(iter(cluster.worker_nodes)), cluster.removed, graceful=False)
        add_node(cluster, s3)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            resumed = [int(s) for s in re.findall(r"\[train\] resuming from step (\d+)", "".join(lines))]
            # resumed on the new node and checkpointed again: a checkpoint in flight at the loss can land before
            # Ray notices the loss, so only one after the resume counts
            if resumed and max(registered_steps(s3, f"{runs}/faults") or [0]) > resumed[0]:
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=30)
    out = "".join(lines)
    resumed = [int(s) for s in re.findall(r"\[train\] resuming from step (\d+)", out)]
    assert resumed and resumed[0] >= max(steps), out[-3000:]
    assert max(registered_steps(s3, f"{runs}/faults")) < TINY["steps"], "the driver loss should land mid-run"

    result = ok(cli(cluster, s3, *argv))
    assert "(resuming)" in result.stdout and "resumed from step" in result.stdout, result.stdout[-2000:]
    assert s3.get_bytes(f"{runs}/faults/export/model.safetensors") == expected

    # evaluated and staged for the Hub straight from the bucket
    result = ok(cli(cluster, s3, "eval", "--model", f"{runs}/faults", "--data", data, "--limit", "4"))
    assert f"wrote {runs}/faults/export/eval.json" in result.stdout
    assert "eval.json" in s3.list(f"{runs}/faults/export")
    result = ok(cli(cluster, s3, "publish", "--model", f"{runs}/faults", "--repo", "me/xl-to-v1", "--dry-run"))
    assert "would push to me/xl-to-v1" in result.stdout and "eval.json" in result.stdout
