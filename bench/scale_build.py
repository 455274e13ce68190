"""`data build` at growing N: is the driver's memory flat, the time per image constant, the first shard early?

    python bench/scale_build.py                    # N = 1k, 4k, 16k synthetic images (about 10 min on 2 cores)
    python bench/scale_build.py --sizes 500 2000   # a quick look

The real build path (`pipeline.build.build`, local Ray, Ray Data index and encode stages, Parquet shards) on
synthetic 64 px PNGs in folders of 1000 (so listing runs as one task per folder), with a trivial, fast
encoder: a stand-in AutoencoderKL of width 8 at 64 px tiles, one tile an image. Each N runs in a fresh
process that starts its own local Ray, so its peak RSS (ru_maxrss) is the driver's alone.

Per N it prints the wall time per image (whole build; and index and encode stages alone), the driver's
peak RSS, and the time from the first worker starting to encode (VAEs loaded) to the first shard on disk,
in shard-times (a shard-time: the median time one worker spends on one shard). Goals (issue 11): peak RSS at
the largest N <= 1.1 x the smallest's + 50 MB; time per image within 20% across N; first shard durable within
two shard-times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(root: Path, count: int, per_folder: int = 1000) -> list[str]:
    """`count` distinct 64x64 PNGs in folders of `per_folder`; returns the folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folders = []
    for i in range(count):
        folder = root / f"d{i // per_folder:03d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
            folders.append(str(folder))
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folders


def one_build(folders: list[str], vae: str, out: str, shard_size: int) -> dict:
    """Runs in the child process: the build, timed by stage; returns figures."""
    from interposer.pipeline import build as build_module
    from interposer.pipeline.build import BuildConfig, build

    stages = {}
    real_index = build_module.build_index

    def timed_index(*args, **kw):  # the index stage alone: listing, hashing, index parts
        start = time.perf_counter()
        try:
            return real_index(*args, **kw)
        finally:
            stages["index"] = time.perf_counter() - start

    build_module.build_index = timed_index
    start = time.perf_counter()
    manifest = build(BuildConfig(images=folders, spaces=[f"v1={vae}"], out=out, tile_size=64, max_tiles=1,
                                 min_size=32, shard_size=shard_size, gpus_per_worker=0, quiet=True))
    wall = time.perf_counter() - start
    run = manifest.run_stats
    # durable = on disk: the first images file (each shard's last file) by its mtime, against the moment the
    # first worker began a shard (wall clock, same machine)
    first_file = min(p.stat().st_mtime for p in Path(out).glob("images/part-*.parquet"))
    return dict(wall=wall, index=stages["index"], encode=run["seconds"], tiles=run["tiles"], shards=run["shards"],
                steady=run["steady_seconds"] / max(run["steady_tiles"], 1),
                first_shard=first_file - run["first_began"], shard_time=run["median_shard_seconds"],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="image counts")
    parser.add_argument("--shard-size", type=int, default=64, help="--shard-size of the builds (default 64)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one build in this fresh process
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(one_build(spec["folders"], spec["vae"], spec["out"], args.shard_size)))
        return

    from interposer.pipeline.standins import make_standin_vae

    work = Path(tempfile.mkdtemp(prefix="scale-build-"))
    try:
        vae = str(make_standin_vae("v1", work / "vae", seed=0))
        t = time.perf_counter()
        folders = make_images(work / "images", max(args.sizes))
        print(f"made {max(args.sizes)} images in {time.perf_counter() - t:.0f} s; shard size {args.shard_size}; "
              f"{os.cpu_count()} CPUs", flush=True)
        rows = []
        for n in args.sizes:
            use = folders[: -(-n // 1000)]
            if n % 1000:
                raise SystemExit("--sizes must be multiples of 1000 (one folder each)")
            spec = dict(folders=use, vae=vae, out=str(work / f"out-{n}"))
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
            proc = subprocess.run([sys.executable, __file__, "--shard-size", str(args.shard_size), "--child",
                                   json.dumps(spec)], capture_output=True, text=True, env=env, cwd=ROOT)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not result:
                raise SystemExit(f"build of {n} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(result[0][7:]) | dict(n=n)
            rows.append(r)
            print(f"N={n:6d}: {r['tiles']} tiles in {r['shards']} shards; wall {r['wall']:.1f} s "
                  f"({1e3 * r['wall'] / n:.2f} ms/image; index stage {1e3 * r['index'] / n:.2f}, encode stage "
                  f"{1e3 * r['encode'] / n:.2f}, encode after the first shard {1e3 * r['steady']:.2f}); "
                  f"driver peak RSS {r['peak_rss_mb']:.0f} MB; first shard on disk {r['first_shard']:.2f} s after "
                  f"encoding began = {r['first_shard'] / r['shard_time']:.2f} shard-times ({r['shard_time']:.2f} s)",
                  flush=True)
            shutil.rmtree(work / f"out-{n}")
        small, large = rows[0], rows[-1]
        rss_ok = large["peak_rss_mb"] <= 1.1 * small["peak_rss_mb"] + 50
        # a build has a fixed start-up (Ray Data stages, actors, VAE load: ~10 s here) that a 1k-image build
        # with a trivial encoder cannot hide; what must not grow with N is the cost of one more image:
        # the marginal time between successive sizes, and the steady encode time per image
        marginal = [(b["wall"] - a["wall"]) / (b["n"] - a["n"]) for a, b in zip(rows, rows[1:])]
        steady = [r["steady"] for r in rows]
        first = max(r["first_shard"] / r["shard_time"] for r in rows)
        print(f"\n{'goal':48s}{'measured':43s}ok")
        goal = f"driver peak RSS at N={large['n']} <= 1.1 x N={small['n']} + 50 MB"
        rss = f"{large['peak_rss_mb']:.0f} MB vs {1.1 * small['peak_rss_mb'] + 50:.0f} MB"
        print(f"{goal:48s}{rss:43s}{rss_ok}")
        for name, values in (("marginal wall time per image", marginal), ("steady encode time per image", steady)):
            spread = max(values) / min(values) - 1 if len(values) > 1 else 0.0
            shown = ", ".join(f"{1e3 * v:.2f}" for v in values)
            print(f"{name + ' within 20%':48s}{f'spread {100 * spread:.0f}% ({shown} ms)':43s}{spread <= 0.2}")
        print(f"{'first shard durable within 2 shard-times':48s}{f'worst {first:.2f} shard-times':43s}{first <= 2}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
