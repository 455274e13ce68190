"""The README's cluster recipe, rehearsed on one machine: a real S3 server, three Ray nodes, nodes lost.

    python bench/cluster.py                  # about 10 minutes on 2 cores (make rehearsal)
    python bench/cluster.py --rounds 1       # one round of each S3-vs-local pair

What runs: SeaweedFS (`weed server -s3`) on loopback with a bucket and a key, given to every node and command
in the standard AWS variables; a Ray cluster of three nodes on this machine (ray.cluster_utils.Cluster: a head
with no CPUs as in cluster.yaml, two worker nodes of one CPU, each its own raylet and object store). Every
command goes through our CLI with RAY_ADDRESS naming the head, as `ray job submit` runs it.

  build  images in s3:// -> a local folder, and -> s3:// (uninterrupted, in rounds: the build's tiles/s once
         its encoders are up, encoding and writing; S3 / local)
  build  -> s3:// with a worker node removed without grace once a third of the shards are in the bucket, a
         replacement node added: the build goes on (or the same command finishes it); every file compared
         byte for byte with the local build
  train  2 ranks, one per worker node, local folder vs s3:// (rounds: rank 0's steps/s between log lines,
         checkpoints included, the first interval left out; S3 / local)
  train  s3://, a worker node removed after the first checkpoint, a replacement added: Ray Train resumes by
         itself; the export compared with the uninterrupted run's
  train  s3://, the driver SIGKILLed after the first checkpoint, the same command rerun: it resumes

Prints one table (stage, nodes, what was lost, where it resumed, identical, wall time) and the two ratios.
At the end everything it started is stopped by pid (the Cluster's nodes, the S3 server) and checked gone.
Goals (issue 31): S3 / local build tiles/s >= 0.9, train steps/s >= 0.95; identical: yes everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from clusters import (RAY_ENV, add_node, cli, digest_local, digest_s3, environment, node_ports,  # noqa: E402
                      registered_steps, start)
from seaweed import SeaweedS3  # noqa: E402

BUCKET = "rehearsal"
# A shard of 8 photos x 4 tiles: at 1024 px a shard is 64 images x 6 tiles on a GPU, seconds of encoding and
# writing against a few fixed requests (its index part, its images file). Shards of 2 images x 2 tiles, as this
# bench had, measure S3's per-request latency, not what a build pays (0.63 there; README).
PHOTO = 288  # px: four 128 px tiles each
BUILD = ["--tile-size", "128", "--max-tiles", "4", "--min-size", "64", "--shard-size", "8", "--gpus-per-worker", "0",
         "--workers", "2"]
# a checkpoint every 100 steps (at ~30 steps/s: every 3 s, ten times v4's cadence of 1000 steps at ~5 steps/s on GPU)
TRAIN = dict(ch_mid=16, blocks=2, batch=8, crop=8, fconst=0, checkpoint_every=100, eval_every=100, log_every=50,
             val_fraction=0.1, workers=2, max_failures=3)


def ok(result, what: str):
    if result.returncode != 0:
        raise SystemExit(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_photos(folder: Path, n: int, side: int = PHOTO) -> Path:
    """n distinct photos: crops of scikit-image's, `side` px square."""
    import numpy as np
    import skimage
    from PIL import Image

    folder.mkdir(parents=True)
    data = Path(skimage.__file__).parent / "data"
    sources = [Image.open(data / name).convert("RGB") for name in ("astronaut.png", "chelsea.png", "coffee.png")]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = sources[i % len(sources)]
        x, y = (int(rng.integers(0, s - side)) for s in img.size)
        img.crop((x, y, x + side, y + side)).save(folder / f"photo-{i:03d}.png")
    return folder


def wait_for(predicate, proc, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"{what}: not seen within {timeout:g} s (exit code {proc.poll()})")


def train_rate(stdout: str) -> float:
    """Rank 0's steps/s between log lines (checkpoints in between included), median over the run but its first
    interval (start-up)."""
    rates = [float(r) for r in re.findall(r"\[train\] step \d+/\d+\s+([\d.]+) steps/s", stdout)]
    return statistics.median(rates[1:] or rates)


def shards_in(s3, uri: str) -> int:
    return len([r for r in s3.list(f"{uri}/images") if r.endswith(".parquet")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="photos in the bucket (default 64: 8 shards)")
    parser.add_argument("--steps", type=int, default=300, help="training steps a run (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each S3-vs-local pair (default 3)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    from ray.cluster_utils import Cluster

    from interposer.pipeline.standins import make_standin_vae

    s3 = SeaweedS3(work / "seaweed").start()
    cluster = Cluster(shutdown_at_exit=False)
    started_pids: list[int] = [s3.proc.pid]
    try:
        s3.bucket(BUCKET)
        with environment({**s3.env, **RAY_ENV}):
            cluster.add_node(num_cpus=0, **node_ports())
            for _ in range(2):
                cluster.add_node(num_cpus=1, **node_ports())
            cluster.wait_for_nodes()
        vaes = {c: make_standin_vae(c, work / "vaes" / c, seed=i, width=32) for i, c in enumerate(("v1", "xl"))}
        spaces = [a for c, p in vaes.items() for a in ("--space", f"{c}={p}")]
        photos = make_photos(work / "photos", args.images)
        images = f"s3://{BUCKET}/photos/"
        s3.put_folder(photos, images)
        print(f"S3 at {s3.endpoint}; Ray head {cluster.address} (0 CPU) + 2 worker nodes (1 CPU each); "
              f"{args.images} photos in {images}", flush=True)

        # ---- build: local folder vs S3, side by side in rounds
        ratios, local_ref, tiles = [], None, 0
        for r in range(args.rounds):
            timing = {}
            for where in ("local", "s3"):
                out = str(work / f"build-{r}") if where == "local" else f"s3://{BUCKET}/datasets/build-{r}"
                t = time.perf_counter()
                result = ok(cli(cluster, s3, "data", "build", "--images", images, *spaces, *BUILD, "--out", out),
                            f"build to {where}")
                wall = time.perf_counter() - t
                # the build's own rate once the encoders are up (encode + write; start-up and index apart)
                timing[where] = float(re.search(r"([\d.]+) tiles/s after the first shard", result.stdout).group(1))
                if where == "local":
                    local_ref = Path(out)
                    tiles = json.loads((local_ref / "manifest.json").read_text())["counts"]["tiles"]
                rows.append(dict(stage=f"build -> {where} folder" if where == "local" else "build -> s3://",
                                 nodes="head + 2", lost="-", resumed="-", identical="-", wall=wall))
            ratios.append(timing["s3"] / timing["local"])  # tiles/s S3 / tiles/s local
            print(f"round {r + 1}: build local {timing['local']:.1f} tiles/s, S3 {timing['s3']:.1f} tiles/s "
                  f"({tiles} tiles)", flush=True)
        build_ratio = statistics.median(ratios)
        reference = digest_local(local_ref)
        shards = len([k for k in reference if k.startswith("images/")])

        # ---- build: a worker node lost once a third of the shards are in the bucket
        uri = f"s3://{BUCKET}/datasets/lost-node"
        t = time.perf_counter()
        proc = start(cluster, s3, "data", "build", "--images", images, *spaces, *BUILD, "--out", uri)
        at = wait_for(lambda: (n := shards_in(s3, uri)) >= shards // 3 and n, proc, 300, "a third of the shards")
        started_pids += _pids(cluster)
        cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
        add_node(cluster, s3)
        out, _ = proc.communicate(timeout=600)
        how = "went on by itself" if proc.returncode == 0 else f"stopped ({proc.returncode}); rerun finished it"
        if proc.returncode != 0:
            ok(cli(cluster, s3, "data", "build", "--images", images, *spaces, *BUILD, "--out", uri), "build rerun")
        same = digest_s3(s3, uri) == reference
        rows.append(dict(stage="build -> s3://", nodes="head + 2", lost=f"a worker node at {at}/{shards} shards",
                         resumed=how, identical="yes" if same else "NO", wall=time.perf_counter() - t))

        # ---- train: local folder vs S3, side by side in rounds
        import yaml

        config = work / "train.yaml"
        config.write_text(yaml.safe_dump(TRAIN | dict(steps=args.steps)))
        data_s3 = f"s3://{BUCKET}/datasets/build-0"
        train = ["--src", "xl", "--dst", "v1", "--config", str(config)]
        ratios, export = [], None
        for r in range(args.rounds):
            timing = {}
            for where in ("local", "s3"):
                data, runs = (str(work / "build-0"), str(work / "runs")) if where == "local" else \
                    (data_s3, f"s3://{BUCKET}/runs")
                t = time.perf_counter()
                result = ok(cli(cluster, s3, "train", "--data", data, "--out", runs, "--name", f"plain-{r}", *train),
                            f"train on {where}")
                timing[where] = train_rate(result.stdout)
                rows.append(dict(stage=f"train {where} folder" if where == "local" else "train s3://",
                                 nodes="head + 2", lost="-", resumed="-", identical="-",
                                 wall=time.perf_counter() - t))
                if where == "s3" and export is None:
                    export = s3.get_bytes(f"{runs}/plain-{r}/export/model.safetensors")
            ratios.append(timing["s3"] / timing["local"])  # steps/s S3 / steps/s local
            print(f"round {r + 1}: train local {timing['local']:.1f} steps/s, S3 {timing['s3']:.1f} steps/s "
                  f"({args.steps} steps)", flush=True)
        train_ratio = statistics.median(ratios)
        runs = f"s3://{BUCKET}/runs"
        argv = ["train", "--data", data_s3, "--out", runs, *train]

        # ---- train: a worker node lost after the first checkpoint
        t = time.perf_counter()
        proc = start(cluster, s3, *argv, "--name", "lost-node")
        steps = wait_for(lambda: registered_steps(s3, f"{runs}/lost-node"), proc, 300, "the first checkpoint")
        started_pids += _pids(cluster)
        cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
        add_node(cluster, s3)
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"train with a node lost failed:\n{out[-3000:]}")
        resumed = re.findall(r"\[train\] resuming from step (\d+)", out)
        same = s3.get_bytes(f"{runs}/lost-node/export/model.safetensors") == export
        rows.append(dict(stage="train s3://", nodes="head + 2", lost=f"a worker node after step {max(steps)}",
                         resumed=f"step {resumed[0]}, by itself" if resumed else "NOT RESUMED",
                         identical="yes" if same else "NO", wall=time.perf_counter() - t))

        # ---- train: the driver lost, the same command rerun
        t = time.perf_counter()
        proc = start(cluster, s3, *argv, "--name", "lost-driver")
        steps = wait_for(lambda: registered_steps(s3, f"{runs}/lost-driver"), proc, 300, "the first checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        result = ok(cli(cluster, s3, *argv, "--name", "lost-driver"), "train rerun")
        resumed = re.findall(r"resumed from step (\d+)", result.stdout)
        same = s3.get_bytes(f"{runs}/lost-driver/export/model.safetensors") == export
        rows.append(dict(stage="train s3://", nodes="head + 2", lost=f"the driver after step {max(steps)}",
                         resumed=f"step {resumed[0]}, on rerun" if resumed else "NOT RESUMED",
                         identical="yes" if same else "NO", wall=time.perf_counter() - t))
    finally:
        started_pids += _pids(cluster)
        cluster.shutdown()
        s3.stop()
        left = [p for p in started_pids if _alive(p)]
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| stage | nodes | lost | resumed | identical | wall s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['nodes']} | {r['lost']} | {r['resumed']} | {r['identical']} | {r['wall']:.1f} |")
    print(f"\nS3 / local folder, median of {args.rounds} round(s): build tiles/s ratio {build_ratio:.2f} "
          f"(goal >= 0.9), train steps/s ratio {train_ratio:.2f} (goal >= 0.95)")
    print(f"processes left running of the {len(started_pids)} started (S3 server, Ray nodes): {len(left)}")


def _pids(cluster) -> list[int]:
    """The pids of every process the Cluster started on its nodes now up (raylets, stores, GCS, ...)."""
    nodes = [n for n in (cluster.head_node, *cluster.worker_nodes) if n is not None]
    return [info.process.pid for n in nodes for infos in n.all_processes.values() for info in infos]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is gone in all but name
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    main()
